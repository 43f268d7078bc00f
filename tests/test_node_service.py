"""The node as a systemd service: the unit text, and install/uninstall in a temporary root.

Commands go to a recording runner (no real systemd is touched); files and directories are
real, under a temporary root. Where ``systemd-analyze`` exists, it checks the unit.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import ConfigError, NotFoundError
from edgeos.node import service
from edgeos.node.service import CommandResult, ServiceError, ServicePlan

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ENABLE = ["systemctl", "enable", "--now", "edgeos-node.service"]
PASSWD = "edgeos:x:998:998::/var/lib/edgeos:/usr/sbin/nologin\n"


class Recorder:
    """A runner that records commands and answers like a machine with no edgeos user yet."""

    def __init__(self, *, fail: Sequence[str] = (), passwd: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail = list(fail)  # a command line that fails
        self.passwd = passwd  # what `getent passwd edgeos` answers (None: no such user)

    def __call__(self, command: Sequence[str]) -> CommandResult:
        self.commands.append(list(command))
        if list(command) == self.fail:
            return CommandResult(1, "", f"{command[0]}: simulated failure")
        if list(command[:2]) == ["getent", "passwd"]:
            return CommandResult(0, self.passwd) if self.passwd else CommandResult(2)
        if list(command[:2]) == ["getent", "group"]:
            return CommandResult(0, "edgeos:x:998:\n") if self.passwd else CommandResult(2)
        return CommandResult(0)

    def changes(self) -> list[list[str]]:
        """Commands other than look-ups."""
        return [c for c in self.commands if c[0] != "getent"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file system root where systemd runs."""
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/nologin").touch()
    return root


def plan(**changes: object) -> ServicePlan:
    return ServicePlan(python=Path(sys.executable), **changes)  # type: ignore[arg-type]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def directives(unit: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) → values, as systemd reads them (comments skipped)."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key), []).append(value)
    return found


# -- the unit ---------------------------------------------------------------------------
def test_the_unit_has_every_directive() -> None:
    unit = service.render_unit(plan(memory_max_mb=700, user="edge", group="edge"))
    d = directives(unit)
    assert d["Service", "ExecStart"] == [
        f"{sys.executable} -m edgeos node run --data-dir /var/lib/edgeos"
    ]
    expected = {
        "Type": "exec", "User": "edge", "Group": "edge", "Restart": "on-failure",
        "RestartSec": "5", "MemoryMax": "700M", "KillSignal": "SIGTERM", "TimeoutStopSec": "30",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/edgeos",
        "ProtectHome": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "CapabilityBoundingSet": "", "WorkingDirectory": "/var/lib/edgeos",
    }  # fmt: skip
    for key, value in expected.items():
        assert d["Service", key] == [value], key
    assert d["Service", "Environment"] == [
        "EDGEOS_DATA_DIR=/var/lib/edgeos",
        "EDGEOS_MEMORY_BUDGET_MB=700",
    ]
    assert d["Install", "WantedBy"] == ["multi-user.target"]
    assert d["Unit", "After"] == ["network-online.target"]


def test_a_budget_from_node_yaml_is_not_overridden_by_the_unit() -> None:
    d = directives(service.render_unit(plan(memory_max_mb=300, budget_in_unit=False)))
    assert d["Service", "MemoryMax"] == ["300M"]
    assert d["Service", "Environment"] == ["EDGEOS_DATA_DIR=/var/lib/edgeos"]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    path = tmp_path / "edgeos-node.service"
    path.write_text(service.render_unit(plan()))
    done = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # verify exits 0 even for an unknown key; what it says about our file is what counts.
    complaints = [line for line in done.stderr.splitlines() if "edgeos-node" in line]
    assert done.returncode == 0, done.stderr
    assert complaints == []
    # The check can fail: a misspelt directive is reported.
    path.write_text(service.render_unit(plan()).replace("Restart=", "Restartt="))
    done = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Unknown key" in done.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_rates_the_hardening_ok(tmp_path: Path) -> None:
    path = tmp_path / "edgeos-node.service"
    path.write_text(service.render_unit(plan()))
    done = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=yes", "--threshold=30", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if "--offline" in done.stderr:
        pytest.skip("this systemd-analyze cannot review a unit file offline")
    # Exposure is 0-10, the threshold 0-100: at most 3.0 ("OK"; 1.9 when written).
    assert done.returncode == 0, done.stdout[-300:]


# -- install ----------------------------------------------------------------------------
def test_install_runs_the_steps_in_order_and_leaves_a_service(root: Path) -> None:
    runner = Recorder()
    report = service.install(plan(), root, runner=runner)
    assert runner.changes() == [
        ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/edgeos",
         "--no-create-home", "--shell", "/usr/sbin/nologin", "edgeos"],
        ["chown", "edgeos:", str(root / "var/lib/edgeos")],
        ["systemctl", "daemon-reload"],
        ENABLE,
    ]  # fmt: skip
    unit = root / "etc/systemd/system/edgeos-node.service"
    assert report.unit_path == unit
    assert unit.read_text() == service.render_unit(plan())
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "var/lib/edgeos").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "var/lib").stat().st_mode) == 0o755
    assert not list(unit.parent.glob(".*.tmp"))
    assert any("journalctl -u edgeos-node" in note for note in report.notes)


def test_an_existing_user_is_used_with_its_group(root: Path) -> None:
    runner = Recorder(passwd=PASSWD)
    service.install(plan(), root, runner=runner)
    assert [c[0] for c in runner.changes()] == ["chown", "systemctl", "systemctl"]
    assert "Group=edgeos\n" in (root / "etc/systemd/system/edgeos-node.service").read_text()


def test_fleet_options_are_stored_0600_and_kept_out_of_the_unit(root: Path) -> None:
    runner = Recorder()
    p = plan(fleet_url="https://fleet.example", join_token="s3cret-token")
    report = service.install(p, root, runner=runner)
    join = root / "var/lib/edgeos/fleet-join.json"
    assert stat.S_IMODE(join.stat().st_mode) == 0o600
    assert '"join_token": "s3cret-token"' in join.read_text()
    assert ["chown", "edgeos:", str(join)] in runner.commands
    assert "s3cret" not in (root / "etc/systemd/system/edgeos-node.service").read_text()
    assert "s3cret" not in repr(p)
    assert any("the node enrolls at its first start" in note for note in report.notes)


@pytest.mark.parametrize(
    "failing",
    [
        ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/edgeos",
         "--no-create-home", "--shell", "/usr/sbin/nologin", "edgeos"],
        ["chown", "edgeos:", "<data>"],
        ["systemctl", "daemon-reload"],
        ENABLE,
    ],
    ids=["useradd", "chown", "daemon-reload", "enable"],
)  # fmt: skip
def test_a_failing_step_undoes_every_step_before_it(root: Path, failing: list[str]) -> None:
    before = tree(root)
    failing = [str(root / "var/lib/edgeos") if a == "<data>" else a for a in failing]
    runner = Recorder(fail=failing)
    with pytest.raises(ServiceError) as caught:
        service.install(plan(), root, runner=runner)
    message = str(caught.value)
    assert f"install failed at `{' '.join(failing)}`" in message
    assert "simulated failure" in message
    assert "Needed: " in message
    assert tree(root) == before  # no unit, no data directory, nothing else
    changes = runner.changes()
    after = changes[changes.index(failing) + 1 :]
    if failing[0] != "useradd":
        assert ["userdel", "edgeos"] in after
        assert "removed user edgeos" in message
    if failing == ENABLE:
        # enable --now may have half-happened, and the unit was removed before a reload.
        assert after[0] == ["systemctl", "disable", "--now", "edgeos-node.service"]
        assert after[1] == ["systemctl", "daemon-reload"]
        assert "removed /etc/systemd/system/edgeos-node.service" in message


def test_an_undo_that_fails_is_named(root: Path) -> None:
    class Stubborn(Recorder):
        def __call__(self, command: Sequence[str]) -> CommandResult:
            if command[0] == "userdel":
                self.commands.append(list(command))
                return CommandResult(8, "", "userdel: user edgeos is currently used")
            return super().__call__(command)

    with pytest.raises(ServiceError, match=r"Could not undo \(do it by hand\): useradd"):
        service.install(plan(), root, runner=Stubborn(fail=ENABLE))


def test_without_root_nothing_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runner = Recorder()
    with pytest.raises(ServiceError, match=r"needs root: run it with sudo"):
        service.install(plan(data_dir=Path("/var/lib/edgeos-test-never")), runner=runner)
    assert runner.commands == []
    assert not Path("/var/lib/edgeos-test-never").exists()
    with pytest.raises(ServiceError, match=r"needs root"):
        service.uninstall(keep_data=True, runner=runner)
    assert runner.commands == []


@pytest.mark.parametrize("mb", [0, 32, 63])
def test_a_memory_budget_too_small_to_start_is_refused(root: Path, mb: int) -> None:
    with pytest.raises(ConfigError, match=r"below the 64 MB a node needs to start"):
        service.build_plan(memory_max_mb=mb, root=root)
    before, runner = tree(root), Recorder()
    with pytest.raises(ConfigError, match=r"--memory-max-mb"):
        service.install(plan(memory_max_mb=mb), root, runner=runner)
    assert runner.commands == []
    assert tree(root) == before


def test_the_memory_limit_follows_node_yaml(root: Path) -> None:
    data = root / "var/lib/edgeos"
    data.mkdir(parents=True)
    (data / "node.yaml").write_text("memory_budget_mb: 300\n")
    p = service.build_plan(root=root)
    assert (p.memory_max_mb, p.budget_in_unit) == (300, False)
    assert service.build_plan(memory_max_mb=400, root=root).budget_in_unit is False
    with pytest.raises(ConfigError, match=r"kernel would stop the node before its guard"):
        service.build_plan(memory_max_mb=200, root=root)
    (data / "node.yaml").unlink()
    p = service.build_plan(memory_max_mb=200, root=root)
    assert (p.memory_max_mb, p.budget_in_unit) == (200, True)
    assert service.build_plan(root=root).memory_max_mb == service.DEFAULT_MEMORY_MAX_MB


def test_a_data_directory_the_service_cannot_use_is_refused(root: Path) -> None:
    (root / "var").mkdir()
    (root / "var/lib").write_text("a file where a directory should be")
    before, runner = tree(root), Recorder()
    with pytest.raises(ServiceError, match=r"/var/lib is not a directory"):
        service.install(plan(), root, runner=runner)
    assert runner.changes() == []
    assert tree(root) == before

    (root / "var/lib").unlink()
    (root / "var/lib").mkdir(mode=0o700)
    (root / "var/lib").chmod(0o700)
    with pytest.raises(ServiceError, match=r"could not reach .* /var/lib is mode 0700"):
        service.install(plan(), root, runner=runner)

    (root / "var/lib").chmod(0o755)
    (root / "var/lib/edgeos").mkdir()
    (root / "var/lib/edgeos/somebody-elses.txt").write_text("x")
    with pytest.raises(ServiceError, match=r"already holds files, and it is not owned by user"):
        service.install(plan(), root, runner=Recorder())
    assert runner.changes() == []


def test_install_needs_systemd_and_no_previous_install(root: Path) -> None:
    (root / "run/systemd/system").rmdir()
    with pytest.raises(ServiceError, match=r"systemd is not running .* `edgeos node run"):
        service.install(plan(), root, runner=Recorder())
    (root / "run/systemd/system").mkdir()
    service.install(plan(), root, runner=Recorder())
    runner = Recorder()
    with pytest.raises(ServiceError, match=r"already installed .* uninstall --keep-data"):
        service.install(plan(), root, runner=runner)
    assert runner.changes() == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"user": "Root Admin"}, "is not a system user name"),
        ({"data_dir": Path("relative/dir")}, "must be an absolute path"),
        ({"data_dir": Path("/home/alice/edgeos")}, "ProtectHome=yes hides"),
        ({"data_dir": Path("/tmp/edgeos")}, "PrivateTmp=yes"),
        ({"data_dir": Path("/var/lib/my edgeos")}, "must be an absolute path"),
        ({"fleet_url": "https://fleet.example"}, "go together"),
        ({"fleet_url": "ftp://x", "join_token": "t"}, "is not an http(s) URL"),
        ({"fleet_url": "https://f.example", "join_token": "a b"}, "without spaces"),
    ],
)
def test_bad_inputs_are_refused_before_anything_happens(
    root: Path, changes: dict[str, object], message: str
) -> None:
    runner = Recorder()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        service.install(plan(**changes), root, runner=runner)
    assert runner.commands == []


def test_edgeos_under_a_home_directory_cannot_be_a_service(tmp_path: Path) -> None:
    python = Path("/home/alice/.venv/bin/python")
    problems = service.interpreter_problems(Path(sys.executable), Path("/home/alice/site/edgeos"))
    assert any("ProtectHome=yes" in p and "/opt/edgeos" in p for p in problems)
    assert service.interpreter_problems(python, tmp_path) == [
        f"the interpreter {python} is not an executable file"
    ]


# -- uninstall --------------------------------------------------------------------------
def test_uninstall_keeping_the_data(root: Path) -> None:
    service.install(plan(), root, runner=Recorder())
    (root / "var/lib/edgeos/node.db").write_text("state")
    runner = Recorder(passwd=PASSWD)
    report = service.uninstall(root, keep_data=True, runner=runner)
    assert runner.commands == [
        ["systemctl", "disable", "--now", "edgeos-node.service"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "reset-failed", "edgeos-node.service"],
    ]
    assert not (root / "etc/systemd/system/edgeos-node.service").exists()
    assert (root / "var/lib/edgeos/node.db").read_text() == "state"
    assert (report.data_dir, report.data_kept) == (Path("/var/lib/edgeos"), True)


def test_uninstall_removing_the_data_and_the_user(root: Path) -> None:
    service.install(plan(), root, runner=Recorder())
    runner = Recorder(passwd=PASSWD)
    report = service.uninstall(root, keep_data=False, runner=runner)
    assert not (root / "var/lib/edgeos").exists()
    assert runner.changes()[-1] == ["userdel", "edgeos"]
    assert report.data_kept is False
    with pytest.raises(NotFoundError, match=r"not installed"):
        service.uninstall(root, keep_data=False, runner=Recorder())


def test_uninstall_keeps_a_user_it_did_not_make(root: Path) -> None:
    service.install(plan(user="svc"), root, runner=Recorder())
    runner = Recorder(passwd="svc:x:1001:1001::/home/svc:/bin/bash\n")
    service.uninstall(root, keep_data=False, runner=runner)
    assert not any(c[0] == "userdel" for c in runner.commands)


def test_a_failing_disable_stops_uninstall_before_anything_is_removed(root: Path) -> None:
    service.install(plan(), root, runner=Recorder())
    with pytest.raises(ServiceError, match=r"nothing was changed"):
        service.uninstall(
            root, keep_data=False,
            runner=Recorder(fail=["systemctl", "disable", "--now", "edgeos-node.service"]),
        )  # fmt: skip
    assert (root / "etc/systemd/system/edgeos-node.service").exists()
    assert (root / "var/lib/edgeos").is_dir()


# -- the command ------------------------------------------------------------------------
def test_dry_run_prints_the_unit_and_the_steps_and_changes_nothing() -> None:
    data = Path("/var/lib/edgeos-dry-run-test")
    result = CliRunner().invoke(
        app, ["node", "install", "--dry-run", "--data-dir", str(data), "--memory-max-mb", "512"]
    )
    assert result.exit_code == 0, result.output
    assert "ExecStart=" in result.output
    assert "MemoryMax=512M" in result.output
    assert "systemctl enable --now edgeos-node.service" in result.output
    assert f"install -d -m 0750 {data}" in result.output
    assert not data.exists()


def test_the_command_refuses_a_small_budget_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgeos", "node", "install", "--memory-max-mb", "16"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "below the 64 MB a node needs to start" in done.stderr
    assert done.stderr.count("\n") == 1
