"""Fault classes of the ingest run: what is the data's fault."""

import subprocess
import sys

import pyarrow as pa

from planpipe.ingest import faults


def test_an_arrow_error_is_a_data_fault_once_pyarrow_is_loaded() -> None:
    assert faults.is_data_fault(pa.ArrowInvalid("bad value"))
    assert not faults.is_data_fault(RuntimeError("a bug"))


def test_the_ingest_engine_does_not_load_pyarrow() -> None:
    # pyarrow and numpy add ~50 MB to the consumer's RSS; nothing on the hot path needs them.
    code = "import sys, planpipe.ingest.engine; print(sorted({'pyarrow', 'numpy'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
