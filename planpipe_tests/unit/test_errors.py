"""Every deliberate planpipe error has one root and keeps the built-in base it had."""

import pytest

from planpipe.agent.handoff import Stopped
from planpipe.capture.cli import OutputClosed
from planpipe.capture.explain import PlanShapeError
from planpipe.capture.logparse import MalformedEntry
from planpipe.capture.safety import SuperuserRefused
from planpipe.contract import ContractViolation
from planpipe.db.migrate import MigrationError
from planpipe.errors import OperatorError, PlanpipeError
from planpipe.health.broker import HealthUnavailable
from planpipe.ingest.baseline_sink import LockWaitTimeout, StaleBatchError
from planpipe.ingest.lag import LagUnavailable
from planpipe.ingest.sinks import Abandoned
from planpipe.plans.findings import RegressionNotFoundError
from planpipe.plans.history import UnknownPlanError
from planpipe.plans.normalize import PlanParseError
from planpipe.routing.producer import SpoolInUse
from planpipe.routing.redis_queue import QueueUnavailable
from planpipe.routing.router import QueueClosed
from planpipe.stack.errors import StackError
from planpipe.topology import TopologyError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (StackError, RuntimeError),
        (SpoolInUse, RuntimeError),
        (StaleBatchError, RuntimeError),
        (LockWaitTimeout, RuntimeError),
        (LagUnavailable, RuntimeError),
        (QueueClosed, RuntimeError),
        (HealthUnavailable, RuntimeError),
        (MigrationError, RuntimeError),
        (TopologyError, ValueError),
        (ContractViolation, Exception),
        (QueueUnavailable, Exception),
        (Abandoned, Exception),
        (UnknownPlanError, LookupError),
        (RegressionNotFoundError, LookupError),
        (PlanParseError, ValueError),
        (PlanShapeError, ValueError),
        (MalformedEntry, ValueError),
        (SuperuserRefused, Exception),
        (OutputClosed, Exception),
        (Stopped, Exception),
    ],
)
def test_planpipe_errors_share_one_root_and_keep_their_old_base(error: type[Exception], kept: type) -> None:
    assert issubclass(error, PlanpipeError)
    assert issubclass(error, kept)


def test_operator_errors_carry_details_for_the_cli() -> None:
    for error in (StackError("port taken", "log tail"), SpoolInUse("spool held", "pid 7")):
        assert isinstance(error, OperatorError)
        assert error.details
        assert "\n" not in str(error)
