import psycopg
import pytest

from planpipe.routing.candidates import RegressionCandidates

pytestmark = pytest.mark.unit


def test_candidates_are_cached_for_the_ttl_and_kept_on_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("planpipe.routing.candidates.time.monotonic", lambda: now[0])
    answers: list[set[str] | Exception] = [{"q1"}, psycopg.OperationalError("down"), {"q2"}]
    calls = []

    def loader(dsn: str) -> set[str]:
        calls.append(dsn)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    candidates = RegressionCandidates("dsn", ttl_s=30, loader=loader)
    assert "q1" in candidates()
    now[0] += 10
    assert "q1" in candidates() and len(calls) == 1  # cached
    now[0] += 30
    assert "q1" in candidates() and len(calls) == 2  # refresh failed: last set kept
    now[0] += 30
    result = candidates()
    assert "q2" in result and "q1" not in result and len(calls) == 3
