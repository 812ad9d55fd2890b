"""Specs of the benchmark harness (``python -m bench``): its command line, its JSON and
its measuring parts. No timing is asserted: only that every case runs (or says why not)
and reports well-formed numbers."""

from __future__ import annotations

import ast
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench import cli
from bench.case import Settings
from bench.harness import ROLES, CaseSpec, CollectiveCounter, HostMemory, Row, load_sdict, summarize
from bench.report import finalize, machine_info, print_report
from bench.runner import Progress, run_cases, run_torchrun
from bench.suites import SUITES, get_suite
from bench.suites._reshard import Layout, chunk_range, model_tensors
from tests.mp import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {f.name for f in fields(Row)}
STAT_KEYS = {"median", "p10", "p90", "min", "max", "mean"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``python -m bench --tiny`` run of every suite, as CI does; shared by the checks."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--size", "small", "--tiny",
           "--json", str(out / "r.json"), "--plot", str(out / "r.png")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    doc = json.loads((out / "r.json").read_text())
    return proc, doc, out


@pytest.mark.dist
def test_tiny_run_covers_every_case_of_every_suite(tiny_run):
    proc, doc, _ = tiny_run
    ran = {(r["suite"], r["case"]) for r in doc["rows"]}
    for suite in SUITES:
        expected = {(suite, spec.name) for spec in get_suite(suite).cases("tiny", "cpu")}
        assert expected <= ran, f"{suite}: missing {expected - ran}\n{proc.stderr[-3000:]}"
    for suite in SUITES:
        assert f"== {suite} ==" in proc.stdout


@pytest.mark.dist
def test_tiny_run_json_header_names_machine_and_software(tiny_run):
    _, doc, _ = tiny_run
    assert doc["schema_version"] == 1
    assert set(doc) == {"schema_version", "meta", "bounds", "rows"}
    meta = doc["meta"]
    assert meta["size"] == "tiny" and meta["device"] == "cpu"
    assert meta["command"].startswith("python -m bench --size small --tiny --json ")
    assert meta["suites"] == list(SUITES)
    assert meta["world_size"] == 2 and meta["backend"] == "gloo"
    assert isinstance(meta["repeat"], int) and meta["repeat"] >= 1
    assert isinstance(meta["warmup"], int) and meta["warmup"] >= 0
    assert meta["date"].endswith("Z") and len(meta["date"]) == 20
    machine, software = meta["machine"], meta["software"]
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert machine["cpu_count"] == os.cpu_count()
    assert isinstance(machine["memory_bytes"], int) and machine["memory_bytes"] > 0
    assert isinstance(machine["gpus"], list)
    assert software["torch"] == torch.__version__
    assert software["python"] == ".".join(map(str, sys.version_info[:3]))
    assert isinstance(software["sdict_ext_compiled"], bool)
    assert isinstance(software["torch_threads"], int)


@pytest.mark.dist
def test_tiny_run_rows_are_well_formed(tiny_run):
    _, doc, _ = tiny_run
    assert doc["rows"]
    for row in doc["rows"]:
        where = f"{row['suite']}/{row['case']}/{row['impl']}"
        assert set(row) == ROW_KEYS, where
        assert row["role"] in ROLES, where
        assert row["status"] in ("ok", "skipped", "error"), where
        assert isinstance(row["bytes"], int) and isinstance(row["tensors"], int), where
        if row["status"] != "ok":
            assert isinstance(row["reason"], str) and row["reason"], where
            assert row["times_s"] is None, where
            continue
        assert row["reason"] is None, where
        times = row["times_s"]
        assert set(times) == STAT_KEYS and all(_number(v) and v >= 0 for v in times.values()), where
        ordered = [times[k] for k in ("min", "p10", "median", "p90", "max")]
        assert ordered == sorted(ordered), where
        assert 1 <= row["repeats"] <= doc["meta"]["repeat"], where
        assert row["warmup"] == doc["meta"]["warmup"], where
        assert row["gbps"] is None or (_number(row["gbps"]) and row["gbps"] > 0), where
        if row["gbps"]:
            assert row["gbps"] == pytest.approx(row["bytes"] / times["median"] / 1e9), where
        assert isinstance(row["host_peak_bytes"], int) and row["host_peak_bytes"] >= 0, where
        assert row["device_peak_bytes"] is None, where  # CPU run
        assert isinstance(row["collectives"], int) and row["collectives"] >= 0, where
        assert isinstance(row["collective_ops"], dict), where
        for stats in row["extra"].values():
            assert set(stats) == STAT_KEYS, where
        assert row["verified"] in (None, True, False), where


@pytest.mark.dist
def test_tiny_run_baselines_and_bounds_always_run(tiny_run):
    """PyTorch's functions and the bounds need nothing from sdict_ext: never skipped,
    unless a PyTorch function does not apply to the case at all (``n/a: why``)."""
    _, doc, _ = tiny_run
    for row in doc["rows"]:
        if row["role"] == "torch" and row["status"] == "skipped":
            assert row["reason"].startswith("n/a: "), (row["case"], row["impl"], row["reason"])
        elif row["role"] in ("torch", "bound"):
            assert row["status"] == "ok", (row["case"], row["impl"], row["reason"])
    assert {"memcpy", "broadcast", "all_gather"} <= set(doc["bounds"])
    assert all(b["gbps"] > 0 for b in doc["bounds"].values())


@pytest.mark.dist
def test_tiny_run_ops_results_are_verified_against_pytorch(tiny_run):
    _, doc, _ = tiny_run
    ours = [r for r in doc["rows"] if r["suite"] == "ops" and r["role"] == "sdict_ext"]
    assert ours
    for row in ours:
        assert row["status"] == "ok" and row["verified"] is True, (row["case"], row["reason"])


def _reshard_layout(spec: CaseSpec) -> Layout:
    p = spec.params
    tensors = model_tensors(p["hidden"], p["ffn"], p["vocab"], p["layers"])
    return Layout(tuple(tensors), src=p["src"], dst=p["dst"])


@pytest.mark.dist
def test_tiny_run_reshard_is_verified_and_moves_exactly_the_bytes_of_the_layouts(tiny_run):
    _, doc, _ = tiny_run
    specs = [s for s in get_suite("utils").cases("tiny", "cpu") if s.params["kind"] == "reshard"]
    assert sorted((s.params["src"], s.params["dst"]) for s in specs) == [(2, 2), (4, 2)]
    for spec in specs:
        layout, world = _reshard_layout(spec), max(2, spec.min_world_size or 0)
        rows = {r["impl"]: r for r in doc["rows"] if r["case"] == spec.name}
        bound = rows["dist.all_to_all_single (same bytes per rank pair)"]
        pairs = layout.pair_bytes(world)
        assert bound["info"]["local_bytes"] == [pairs[r][r] for r in range(world)]
        ours = [r for name, r in rows.items() if name.startswith("sdict_ext.reshard_state_dict")]
        # In place (default bucket, then a small one), and into meta destinations.
        assert [r["role"] for r in ours] == ["sdict_ext", "variant", "variant"]
        for row in ours:
            assert row["status"] == "ok" and row["verified"] is True, (spec.name, row["reason"])
            info = row["info"]
            for key in ("sent_bytes", "received_bytes", "local_bytes"):
                assert info[key] == bound["info"][key], (spec.name, row["impl"], key)
            owned = [layout.owned_bytes(r) for r in range(world)]
            assert info["owned_bytes"] == owned
            assert [a + b for a, b in zip(info["received_bytes"], info["local_bytes"],
                                          strict=True)] == owned
            assert all(0 < b <= 2 * info["bucket_bytes"] for b in info["buffer_bytes"])
            assert info["planned"] is False  # the verifying call reuses the timed calls' plan
        # The variant's small bucket takes more rounds than the default's one.
        assert max(ours[1]["info"]["rounds"]) > max(ours[0]["info"]["rounds"]) == 1


@pytest.mark.dist
def test_tiny_run_multi_rank_cases_count_collectives_on_two_ranks(tiny_run):
    """... or on as many ranks as a case needs (``min_world_size``), when that is more."""
    _, doc, _ = tiny_run
    multi = {s.name: max(2, s.min_world_size or 0)
             for n in SUITES for s in get_suite(n).cases("tiny", "cpu") if s.multi_rank}
    rows = [r for r in doc["rows"] if r["case"] in multi and r["status"] == "ok"]
    assert rows
    for row in rows:
        assert row["world_size"] == multi[row["case"]]
        if row["role"] in ("torch", "bound"):
            assert row["collectives"] >= 1
            assert sum(row["collective_ops"].values()) == row["collectives"]


@pytest.mark.dist
def test_tiny_run_derived_columns_and_exit_status(tiny_run):
    proc, doc, out = tiny_run
    for row in doc["rows"]:
        if row["status"] == "ok" and row["bound"] in doc["bounds"] and row["gbps"]:
            assert row["bound_gbps"] == doc["bounds"][row["bound"]]["gbps"]
            assert row["pct_of_bound"] == pytest.approx(100 * row["gbps"] / row["bound_gbps"])
    cases: dict = {}
    for row in doc["rows"]:
        cases.setdefault((row["suite"], row["case"]), []).append(row)
    for rows in cases.values():
        ours = [r for r in rows if r["role"] == "sdict_ext" and r["status"] == "ok"]
        for row in rows:
            if row["role"] == "torch" and row["status"] == "ok" and ours:
                want = row["times_s"]["median"] / ours[0]["times_s"]["median"]
                assert row["ratio_torch_over_sdict"] == pytest.approx(want)
    broken = [r for r in doc["rows"] if r["status"] == "error" or r["verified"] is False]
    assert proc.returncode == (1 if broken else 0), proc.stderr[-3000:]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stderr
        assert not (out / "r.png").exists()
    else:
        assert (out / "r.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["--size", "huge"],
    ["--repeat", "0"],
    ["--repeat", "x"],
    ["--warmup", "-1"],
    ["--device", "tpu"],
    ["--suite", "nope"],
    ["--plot", "figure.pdf"],
    ["--world-size", "1"],
    ["--timeout", "0"],
    ["--json", "/no-such-directory/r.json"],
    ["--case", "no such case"],
    ["--bogus"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m bench" in err and "error:" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_cuda_on_a_cpu_machine_skips_every_case_and_says_why(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["--tiny", "--device", "cuda", "--json", str(path)]) == 0
    err = capsys.readouterr().err
    assert "CUDA is not available" in err
    rows = json.loads(path.read_text())["rows"]
    assert rows
    assert all(r["status"] == "skipped" and "CUDA is not available" in r["reason"] for r in rows)
    listed = {s.name for name in SUITES for s in get_suite(name).cases("tiny", "cuda")}
    assert {r["case"] for r in rows} == listed


@pytest.mark.parametrize("extra", [[], ["--no-plot"]])
def test_plot_goes_beside_the_json_unless_told_not_to(tmp_path, extra, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["--tiny", "--suite", "ops", "--case", "pack", "--json", str(path),
                     *extra]) == 0
    err = capsys.readouterr().err
    png = tmp_path / "r.png"
    if extra:
        assert not png.exists() and "--plot" not in err and ".png" not in err
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in err and not png.exists()
    else:
        assert png.stat().st_size > 0 and f"wrote {png}" in err


def test_list_names_cases_without_running_them(capsys):
    assert cli.main(["--tiny", "--suite", "ops", "--list"]) == 0
    out = capsys.readouterr().out
    for spec in get_suite("ops").cases("tiny", "cpu"):
        assert spec.name in out
    assert "memcpy" in out  # the bound the ops cases are compared with


def test_repeated_case_selects_any_of_the_texts_with_their_bounds(capsys):
    argv = ["--size", "medium", "--suite", "utils", "--case", "share_memory",
            "--case", "ShardedTensors", "--list"]
    assert cli.main(argv) == 0
    # "<suite>  <case>  [<how it runs>, bound <family>]"
    lines = [line.split("[")[0].split(None, 1)[1].strip() for line in
             capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [
        "create_cpu_state_dict(share_memory) 64x16MB float32",
        "gather_state_dict 1000 ShardedTensors dim 0 uneven",
        "all_gather 256MB",
        "shm_populate 1GB",
    ]


def test_summarize_gives_median_spread_and_extremes():
    stats = summarize([3.0, 1.0, 2.0])
    assert stats == {"median": 2.0, "p10": pytest.approx(1.2), "p90": pytest.approx(2.8),
                     "min": 1.0, "max": 3.0, "mean": 2.0}
    with pytest.raises(ValueError):
        summarize([])


def test_load_sdict_reports_missing_code_as_not_implemented():
    missing = load_sdict("ops", "no_such_function")
    assert missing == (None, "sdict_ext.ops.no_such_function not implemented")
    assert load_sdict("no_such_module", "f") == (None, "sdict_ext.no_such_module.f not implemented")
    fn, why = load_sdict("ops", "pack")
    assert why is None and callable(fn)


def test_host_memory_sees_a_fresh_allocation():
    memory = HostMemory()
    if not memory.available:
        pytest.skip("no /proc/self/clear_refs here")
    base = memory.start()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)
    assert memory.peak_since(base) >= 60 * 2**20
    del block
    base = memory.start()
    assert memory.peak_since(base) < 16 * 2**20


def _row(case: str, impl: str, role: str, median: float, nbytes: int = 10**9) -> Row:
    return Row(suite="s", case=case, impl=impl, role=role, status="ok", reason=None, device="cpu",
               world_size=1, bytes=nbytes, tensors=1, bound="memcpy", params={}, plot=None,
               times_s={k: median for k in STAT_KEYS}, gbps=nbytes / median / 1e9)


def test_finalize_takes_the_best_bound_and_ratios_against_sdict():
    rows = [
        _row("memcpy", "a", "bound", 0.5),
        _row("memcpy", "b", "bound", 0.25),            # the faster bound row: the bound, 4.0
        _row("copy", "torch slow", "torch", 2.0),
        _row("copy", "torch fast", "torch", 1.0),
        _row("copy", "ours", "sdict_ext", 0.5),         # gbps 2.0: half the bound
    ]
    bounds = finalize(rows)
    assert bounds == {"memcpy": {"gbps": 4.0, "case": "memcpy", "impl": "b"}}
    slow, fast, ours = rows[2:]
    assert ours.pct_of_bound == pytest.approx(50.0)
    assert slow.ratio_torch_over_sdict == pytest.approx(4.0)
    assert fast.ratio_torch_over_sdict == pytest.approx(2.0)
    assert ours.ratio_torch_over_sdict == pytest.approx(2.0)  # against the fastest PyTorch
    assert rows[0].ratio_torch_over_sdict is None


def test_case_specs_are_plain_data():
    for name in SUITES:
        for device in ("cpu", "cuda"):
            for spec in get_suite(name).cases("tiny", device):
                assert isinstance(spec, CaseSpec) and spec.suite == name
                json.dumps(spec.params)


def _count_collectives():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])
    counter = CollectiveCounter()
    with counter:
        dist.broadcast(torch.zeros(4), src=0)    # eager c10d
        full = sharded.full_tensor()             # functional collective (DTensor)
    return counter.ops, counter.total, full.tolist()


@pytest.mark.dist
def test_collective_counter_counts_eager_and_functional_collectives():
    for ops, total, full in run_on_ranks(2, _count_collectives, timeout=120):
        assert ops == {"c10d.broadcast_": 1, "_c10d_functional.all_gather_into_tensor": 1}
        assert total == 2
        assert full == list(range(8))


def _broadcast_bound_spec() -> CaseSpec:
    specs = get_suite("limits").cases("tiny", "cpu")
    return next(s for s in specs if s.params["kind"] == "broadcast")


_SETTINGS = Settings(size="tiny", device="cpu", repeat=1, warmup=0, budget_s=1.0,
                     case_timeout_s=120.0, pg_timeout_s=30.0, world_size=2)


@pytest.mark.dist
def test_a_failing_multi_rank_case_is_an_error_row_and_the_next_case_still_runs():
    bad = CaseSpec("utils", "bad case", multi_rank=True, params={"kind": "no such kind"})
    good = _broadcast_bound_spec()
    rows = run_cases([bad, good], _SETTINGS, Progress(2, enabled=False), None)
    bad_rows = [r for r in rows if r.case == "bad case"]
    assert [(r.impl, r.status) for r in bad_rows] == [("(case)", "error")]
    assert "unknown case kind 'no such kind'" in bad_rows[0].reason
    good_rows = [r for r in rows if r.case == good.name]
    assert [(r.status, r.world_size, r.collectives) for r in good_rows] == [("ok", 2, 1)]


@pytest.mark.dist
def test_a_multi_rank_case_past_its_timeout_is_killed_and_reported():
    rows = run_cases([_broadcast_bound_spec()], replace(_SETTINGS, case_timeout_s=0.05),
                     Progress(1, enabled=False), None)
    assert [(r.impl, r.status) for r in rows] == [("(case)", "error")]
    assert "gave no answer within 0.05s" in rows[0].reason


@pytest.mark.dist
def test_a_rank_killed_by_a_signal_leaves_its_stacks_and_the_running_implementation(capfd):
    from tests import bench_crash_suite as crash

    spec = CaseSpec(crash.__name__, crash.CASE, multi_rank=True)
    notes = io.StringIO()
    rows = run_cases([spec], _SETTINGS, Progress(1, stream=notes), None)
    # Rows travel with a rank's reply, so the dead rank's measured rows are lost.
    assert [(r.impl, r.status) for r in rows] == [("(case)", "error")]
    running = f"{crash.__name__}: {crash.CASE}: {crash.IMPL} (sdict_ext)"
    assert f"rank 0: rank process exited (exit code -11, SIGSEGV) while running {running}" in (
        rows[-1].reason
    )
    assert running in notes.getvalue()
    stderr = capfd.readouterr().err
    # faulthandler's Python stack of the dying rank, down to the implementation ...
    assert "Fatal Python error: Segmentation fault" in stderr
    assert 'bench_crash_suite.py", line' in stderr and "in _segfault" in stderr
    # ... and torch's native stack of it.
    assert "SIGSEGV(11)" in stderr and "frame #0:" in stderr


def test_reshard_layout_boxes_are_torch_chunks_and_pairs_cover_each_destination_once():
    layout = Layout(tuple(model_tensors(63, 171, 251, 2)), src=4, dst=2)
    for t in layout.tensors:
        meta = torch.empty(t.shape, device="meta")
        for r in range(4):
            lo, hi = layout.src_box(t, r)[0]
            want = meta.chunk(4, 0)[r].shape[0] if r < len(meta.chunk(4, 0)) else 0
            assert hi - lo == want, (t.key, r)
        for s in range(2):
            box = layout.dst_box(t, s)
            want = meta.shape if t.dst_dim is None else meta.chunk(2, t.dst_dim)[s].shape
            assert tuple(hi - lo for lo, hi in box) == tuple(want), (t.key, s)
    assert chunk_range(3, 4, 3) == (3, 3)  # the 3-row head leaves rank 3 an empty shard
    pairs = layout.pair_bytes(5)  # a fifth rank, in neither layout, moves nothing
    assert pairs[4] == [0] * 5 and [row[4] for row in pairs] == [0] * 5
    for s in range(5):
        assert sum(pairs[r][s] for r in range(5)) == layout.owned_bytes(s)
    assert layout.owned_bytes(0) + layout.owned_bytes(1) > layout.total_bytes  # norms replicate
    assert {t.dtype for t in layout.tensors} == {torch.bfloat16, torch.float32}


def test_report_notes_show_a_rows_info_per_rank_with_bytes_in_mb():
    row = _row("copy", "ours", "sdict_ext", 0.5)
    row.info = {"sent_bytes": [2**20, 3 * 2**19], "rounds": [1, 2], "planned": False}
    meta = {**machine_info(), "size": "tiny", "device": "cpu", "world_size": 2,
            "launcher": "spawned on 127.0.0.1", "backend": "gloo", "command": "python -m bench",
            "date": "2026-12-07T00:00:00Z", "repeat": 3, "warmup": 1, "budget_s": 1.0}
    out = io.StringIO()
    print_report(meta, finalize([row]), [row], out)
    assert "sent MB 1.0/1.5, rounds 1/2, planned False" in out.getvalue()


@pytest.mark.dist
def test_a_case_needing_more_ranks_than_the_run_gets_a_group_of_its_size():
    two = _broadcast_bound_spec()
    four = replace(two, name="broadcast on 4 ranks", min_world_size=4)
    rows = run_cases([four, two], _SETTINGS, Progress(2, enabled=False), None)
    # Cases run by group size, so each size's group starts once.
    assert [(r.case, r.status, r.world_size) for r in rows] == [
        (two.name, "ok", 2), (four.name, "ok", 4)]


def _torchrun_rows(spec: CaseSpec):
    rows = run_torchrun([spec], _SETTINGS, Progress(1, enabled=False), torch.device("cpu"))
    return None if rows is None else [(r.status, r.reason, r.world_size) for r in rows]


@pytest.mark.dist
def test_under_torchrun_a_case_needing_more_ranks_is_skipped_and_says_why():
    spec = replace(_broadcast_bound_spec(), min_world_size=4)
    results = run_on_ranks(2, _torchrun_rows, spec, timeout=120)
    assert results == [[("skipped", "needs 4 ranks, torchrun started 2", 2)], None]


def _bench_imports() -> dict[str, set[str]]:
    """bench module -> the modules it imports, read from the source (every import
    statement, function-local ones included; ``from bench import x`` of a submodule ``x``
    counts as importing ``bench.x``, not ``bench``). A package's ``__init__`` runs before
    any of its modules; that implied edge is no import the code wrote, so it is left out."""
    files = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "bench/suites").glob("*.py"))
    names = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in names else base)
        graph[module] = {name for name in found if name.split(".")[0] in ("bench", "tests")}
        graph[module].discard(module)
    return graph


def test_bench_modules_import_each_other_without_a_cycle():
    graph = _bench_imports()
    assert {"bench.cli", "bench.launch", "bench.runner", "bench.ranks"} <= set(graph)
    assert graph["bench.launch"] and graph["bench.runner"]  # the walk sees imports at all
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle in bench/: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_bench_runs_without_the_test_tree():
    """``python -m bench`` runs from a clean clone, where tests/ is no package it may need."""
    for module, targets in _bench_imports().items():
        assert not {t for t in targets if t.split(".")[0] == "tests"}, module
