"""The lock file the spool and the agent hold for their lifetime."""

from pathlib import Path

import pytest

from planpipe.agent.runner import AgentBusy
from planpipe.process_lock import hold_exclusive_lock

pytestmark = pytest.mark.unit


def test_a_second_holder_gets_the_owners_error_until_the_first_lets_go(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "agent.lock"
    first = hold_exclusive_lock(lock, lambda: AgentBusy("busy"))
    assert lock.read_text().strip().isdigit()  # the holder's pid, for whoever finds the file
    with pytest.raises(AgentBusy, match="busy"):
        hold_exclusive_lock(lock, lambda: AgentBusy("busy"))
    first.close()
    hold_exclusive_lock(lock, lambda: AgentBusy("busy")).close()
