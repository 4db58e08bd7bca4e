"""The bench's verdicts and table (``bench.run.judge``, ``bench.run.table``) on made-up measurements."""

from bench.loadgen import Result
from bench.run import Report, Row, judge, table


def result(rps: float, p50_ms: float = 1.0) -> Result:
    return Result(
        requests=int(rps * 10), seconds=10.0, p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms * 2, mean_ms=p50_ms, errors=0
    )


def report(read: list[float], create: list[float], search_p50: tuple[float, float] = (5.0, 6.0)) -> Report:
    """Rows as ``bench_database`` makes them; ``read`` and ``create`` are each round's ratio to its ceiling."""
    rows = [
        Row("bare_get", "bare FastAPI GET (ceiling)", None, [result(10_000)] * 3),
        Row("bare_post", "bare FastAPI POST (ceiling)", None, [result(9_000)] * 3),
        Row("read", "read Patient by id", 100_000, [result(10_000 * r) for r in read], ratios=read, bare="bare_get"),
        Row(
            "create",
            "create Patient (POST)",
            100_000,
            [result(9_000 * r) for r in create],
            ratios=create,
            bare="bare_post",
        ),
        Row(
            "search_small", "search Patient?identifier=sys|value", 1_000, [result(900, search_p50[0])], bare="bare_get"
        ),
        Row(
            "search_large",
            "search Patient?identifier=sys|value",
            100_000,
            [result(900, search_p50[1])],
            bare="bare_get",
        ),
    ]
    return Report("sqlite", rows)


def test_each_goal_is_judged_on_the_median_round_with_the_range_beside_it():
    judged = report(read=[0.39, 0.45, 0.50], create=[0.090, 0.070, 0.075], search_p50=(5.0, 10.5))
    judge(judged)
    read, create, large = judged.row("read"), judged.row("create"), judged.row("search_large")
    assert read is not None and create is not None and large is not None
    assert (read.passed, read.measured) == (True, "45.0% (39.0% to 50.0%)")  # one round below 40% does not fail it
    assert (create.passed, create.measured) == (False, "7.5% (7.0% to 9.0%)")  # nor does one above 8% pass it
    assert (large.passed, large.measured) == (False, "2.10x")


def test_a_ceiling_that_failed_gives_no_verdict():
    judged = report(read=[0.5], create=[0.1])
    bare_post = judged.row("bare_post")
    assert bare_post is not None
    bare_post.error = "wrk exited 1"
    judge(judged)
    create = judged.row("create")
    assert create is not None and create.passed is None and create.measured == ""


def test_the_table_shows_the_median_ratio_and_the_verdicts():
    judged = report(read=[0.42, 0.44, 0.46], create=[0.081, 0.085, 0.088])
    judge(judged)
    lines = table(judged).splitlines()
    assert len(lines) == 2 + 6
    create = next(line for line in lines if line.startswith("| create"))
    cells = [cell.strip() for cell in create.strip("|").split("|")]
    assert cells[2:4] == ["3", "765"]  # rounds; the median req/s (9,000 at 8.5%)
    assert cells[8:] == ["8.5%", "≥ 8% of bare", "8.5% (8.1% to 8.8%)", "**pass**"]
    search = next(line for line in lines if line.startswith("| search") and "100,000" in line)
    assert "Patient?identifier=sys\\|value" in search  # the pipe escaped, the row still has 12 cells
    assert search.count(" | ") == 11
