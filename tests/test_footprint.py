"""The footprint budget of a node, watched with a generous margin (``bench/footprint.py``
measures it properly).

An idle node (empty data directory: no model, no agent) must not import what it does not
use: numpy and ONNX Runtime come with the first model, pydantic with the first manifest,
Typer and Rich only for commands other than ``node run``, and the fleet's server code
never. Goals: under 50 MB resident, ready in under 2 s, under 1% of a core when idle;
the test allows 60 MB, 4 s and 5%.

The node running the demo agent is watched by the bench's smoke test: its peak with the
agent's memory on the 8-bit embedding model (measured 151 MB; the goal of 100 MB is not
met, see README) and without memory (measured 111 MB), each with a margin; and the memory
tokenizes without the ``tokenizers`` package (``edgeos.memory.wordpiece``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgeos.cli.main import node_run_flags
from edgeos.demo.inventory_demo import EMBEDDING_MODEL
from edgeos.demo.train import DemoModels
from edgeos.node.process import ServerProcess, node_process
from edgeos.protocol.datatypes import DATATYPES
from edgeos.telemetry.process import process_cpu_seconds, process_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# Modules an idle node must not have imported, and why.
NOT_IMPORTED = {
    "numpy": "comes with the first model (ONNX Runtime needs it)",
    "onnxruntime": "comes with the first model",
    "onnx": "only reading a model file needs it",
    "pydantic": "only reading a manifest needs it",
    "yaml": "only reading a YAML file needs it",
    "typer": "the lean path of `edgeos node run` skips the CLI framework",
    "rich": "the lean path of `edgeos node run` skips the CLI framework",
    "httpx": "only an HTTP connector needs it",
    "edgeos.fleet": "the node never imports the fleet's code",
    "opentelemetry": "the tracing SDK loads with a run's first span",
    "watchfiles.main": "only uvicorn's --reload needs it (blocked: imports as None)",
}

linux_only = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads the node's memory and CPU from /proc"
)


def imported(log: str) -> set[str]:
    """Module names in a ``-X importtime`` log."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def idle_node(data_dir: Path, *python_flags: str) -> ServerProcess:
    node = node_process(data_dir)
    node.command = [node.command[0], *python_flags, *node.command[1:]]
    return node


@linux_only
def test_an_idle_node_is_small_quick_and_quiet(tmp_path: Path) -> None:
    node = idle_node(tmp_path / "node")
    started = time.perf_counter()
    with node:
        ready = time.perf_counter() - started
        assert node.process is not None
        pid = node.process.pid
        time.sleep(0.5)  # past the executor's first scan
        cpu_before = process_cpu_seconds(pid)
        watched = time.perf_counter()
        time.sleep(3.0)
        cpu = (process_cpu_seconds(pid) or 0.0) - (cpu_before or 0.0)
        share = cpu / (time.perf_counter() - watched)
        rss = process_rss_bytes(pid)
        maps = Path(f"/proc/{pid}/maps").read_text()
    assert ready < 4.0, f"ready after {ready:.2f} s (goal: 2 s)"
    assert rss is not None
    assert rss < 60 * MB, f"idle node uses {rss / MB:.1f} MB resident (goal: 50 MB)"
    assert share < 0.05, f"idle node used {share:.1%} of a core (goal: 1%)"
    # Their shared libraries would be mapped had they been imported.
    assert "_multiarray_umath" not in maps, "an idle node loaded numpy"
    assert "onnxruntime_pybind11_state" not in maps, "an idle node loaded ONNX Runtime"


def test_an_idle_node_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    with idle_node(tmp_path / "node", "-X", "importtime") as node:
        # What an idle node is asked in passing must not pull them in either.
        with node.client(timeout=5.0) as client:
            for path in ("/metrics", "/v2", "/v2/models/none", "/v2/health/live"):
                client.get(path)
        log = node.log()
    modules = imported(log)
    assert "edgeos.node.access" in modules, "the importtime log is not there"
    wrong = {
        name: why
        for name, why in NOT_IMPORTED.items()
        if any(m == name or m.startswith(name + ".") for m in modules)
    }
    assert not wrong, f"an idle node imported: {wrong}"


def test_a_node_with_an_http_connector_leaves_out_httpx_s_command_line(tmp_path: Path) -> None:
    # httpx imports its CLI (Rich, Pygments, Click) when they are installed; the node
    # blocks it: ~4 MB of the demo node.
    data = tmp_path / "node"
    data.mkdir()
    (data / "connectors.yaml").write_text(
        yaml.safe_dump({"supplier": {"type": "http", "base_url": "http://127.0.0.1:9",
                                     "operations": {"reorder": {"method": "POST", "path": "/o"}}}})
    )  # fmt: skip
    with idle_node(data, "-X", "importtime") as node:
        log = node.log()
    modules = imported(log)
    assert "httpx" in modules, "the node did not load its HTTP connector"
    assert not {m for m in modules if m.split(".")[0] in ("rich", "pygments", "httpx._main")}


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (["node", "run"], {"data_dir": None, "host": None, "port": None}),
        (
            ["node", "run", "--data-dir", "d", "--host", "0.0.0.0", "--port", "8470"],
            {"data_dir": Path("d"), "host": "0.0.0.0", "port": 8470},
        ),
        (["node", "run", "--port=9000"], {"data_dir": None, "host": None, "port": 9000}),
    ],
)
def test_node_run_with_plain_flags_skips_typer(args: list[str], flags: dict[str, object]) -> None:
    assert node_run_flags(args) == flags


@pytest.mark.parametrize(
    "args",
    [
        ["node", "settings"],
        ["model", "list"],
        ["node", "run", "--help"],
        ["node", "run", "--port", "80", "--port", "81"],
        ["node", "run", "--port", "08470"],
        ["node", "run", "--port", "http"],
        ["node", "run", "--port"],
        ["node", "run", "--data-dir", ""],
        ["node", "run", "--unknown", "x"],
        ["node", "run", "extra"],
    ],
)
def test_anything_else_goes_through_typer(args: list[str]) -> None:
    assert node_run_flags(args) is None


def test_typer_still_judges_what_the_lean_path_leaves(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeos", "node", "run", "--port", "http"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "EDGEOS_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_datatype_sizes_agree_with_numpy() -> None:
    for info in DATATYPES.values():
        expected = 0 if info.name == "BYTES" else info.numpy.itemsize
        assert info.itemsize == expected, info.name


@linux_only
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_footprint_bench_smoke(demo_models: DemoModels) -> None:
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "footprint.py"),
            "--models", str(demo_models.out_dir),
            "--idle-seconds", "1", "--agent-seconds", "3", "--starts", "1",
        ],
        capture_output=True, text=True, timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    peaks = {
        match[1]: float(match[2])
        for match in re.finditer(
            r"agent \+ model(, no memory| \+ memory) \(peak\)\W*([\d.]+) MB", out
        )
    }
    # Measured over 60 s: 151 MB with memory (int8 embedding model), 111 MB without.
    assert 0 < peaks[", no memory"] < 140, out
    if (ROOT / EMBEDDING_MODEL).exists():  # `make embedding-model`; the bench says so without it
        assert 0 < peaks[" + memory"] < 180, out
        assert "notes: ONNX Runtime loaded, tokenizers not loaded" in out
    else:
        assert "the demo agent runs without memory" in out
    for text in (
        "resident memory, idle",
        "resident memory, demo agent + model",
        "model, no memory (steady)",
        "start-up to ready",
        "idle CPU over",
        "disk: installation",
        "after a day (extrapolated)",
        "KB of database a run (",
        "a day for an agent run once a minute), by table: ",
        "edgecore (KubeEdge)",
        "Greengrass nucleus",
        "goal: idle ->",
    ):
        assert text in out, text
    assert "no memory: ONNX Runtime loaded" in out
    # The floor (a bare process holding the same model) is under the node that runs it.
    floor = re.search(r"same model alone \(peak / steady\)\W*[\d.]+ MB / ([\d.]+) MB", out)
    steady = re.search(r"model, no memory \(steady\)\W*([\d.]+) MB", out)
    assert floor is not None, out
    assert steady is not None, out
    assert 30 < float(floor[1]) < float(steady[1])
