"""The node as a systemd service: the unit, and installing and removing it.

:func:`render_unit` is pure: a :class:`ServicePlan` in, the unit's text out.
:func:`install` and :func:`uninstall` perform the steps; every external command (``getent``,
``useradd``, ``chown``, ``systemctl``) goes through an injectable runner, so tests can
record the commands without a real systemd. Every input and precondition is checked before
anything is written, and when a step fails :func:`install` undoes the steps already done:
a machine is never left half-installed.

Choices, and why:

- **Logs go to journald, not to files.** The node logs to stderr; systemd hands that to
  the journal (``journalctl -u edgeos-node``), which rotates and caps it by itself
  (``SystemMaxUse=`` in journald.conf). So no logrotate file is written.
- **One memory number.** ``MemoryMax=`` (the kernel's hard limit) comes from the node's
  memory budget (``memory_budget_mb``): from ``--memory-max-mb``, else from ``node.yaml``.
  When ``node.yaml`` sets no budget, the unit sets ``EDGEOS_MEMORY_BUDGET_MB`` to the same
  number, so the node's resource guard unloads models near it before the kernel kills.
- **Fleet enrollment is stored, not used yet.** ``--fleet URL --join-token T`` are checked
  and kept in ``<data dir>/fleet-join.json`` (mode 0600, owned by the service user), never in
  the unit (unit files are world-readable). They take effect when the fleet control plane
  lands; until then ``edgeos node status`` reports the node as not enrolled, join pending.
- **Hardening that costs the node nothing.** The node needs no capabilities, writes only
  its data directory, and uses ordinary system calls. ``PrivateDevices=`` is left off so
  GPU execution providers can reach their devices, and ``MemoryDenyWriteExecute=`` is left
  off because libffi callbacks (ctypes) need writable executable memory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from edgeos.errors import ConfigError, EdgeOSError, NotFoundError
from edgeos.files import write_atomic
from edgeos.settings import MIN_MEMORY_MB, load_settings

UNIT_NAME = "edgeos-node.service"
UNIT_DIR = Path("/etc/systemd/system")
FLEET_JOIN_FILE = "fleet-join.json"
DEFAULT_USER = "edgeos"
DEFAULT_DATA_DIR = Path("/var/lib/edgeos")
#: ``MemoryMax=`` when neither ``--memory-max-mb`` nor ``node.yaml`` gives a budget: the
#: default model budget (512 MB), an idle node (~65 MB), and room for connections and
#: isolated agent workers, which run in the same cgroup and count against the same limit.
DEFAULT_MEMORY_MAX_MB = 1024

# Paths are written into the unit verbatim, so only characters that need no quoting or
# escaping there (no spaces, quotes, '%' specifiers, '$' expansions) are accepted.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
# Hidden from the service by ProtectHome=yes (homes) or PrivateTmp=yes (temporary dirs).
_HIDDEN = {
    Path("/home"): "ProtectHome=yes hides home directories from the service",
    Path("/root"): "ProtectHome=yes hides home directories from the service",
    Path("/run/user"): "ProtectHome=yes hides home directories from the service",
    Path("/tmp"): "PrivateTmp=yes gives the service its own empty /tmp",
    Path("/var/tmp"): "PrivateTmp=yes gives the service its own empty /var/tmp",
}
# Where a data directory cannot live: the service would not see it, or it would not last.
_NOT_DATA = {
    **_HIDDEN,
    Path("/run"): "/run is emptied at every boot",
    Path("/proc"): "it is a kernel filesystem",
    Path("/sys"): "it is a kernel filesystem",
    Path("/dev"): "it is a device filesystem",
}


class ServiceError(EdgeOSError):
    """Installing or removing the service failed; the message says what, and what is needed."""


@dataclass(frozen=True)
class CommandResult:
    """What an external command returned."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


#: Runs one external command and returns its result; never raises for a failed command.
Runner = Callable[[Sequence[str]], CommandResult]


def system_runner(command: Sequence[str]) -> CommandResult:
    """Run a command on this machine (127 when it does not exist, as a shell would say)."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, check=False, timeout=120
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{command[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{command[0]}: no answer after 120 s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class ServicePlan:
    """Everything the unit and the install steps are made from."""

    user: str = DEFAULT_USER
    #: The unit's ``Group=``; None: a group named like the user (``useradd --user-group``).
    group: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    memory_max_mb: int = DEFAULT_MEMORY_MAX_MB
    #: Also give the node ``EDGEOS_MEMORY_BUDGET_MB=memory_max_mb``; False when node.yaml
    #: sets a budget of its own (at most ``memory_max_mb``), which then stays in force.
    budget_in_unit: bool = True
    fleet_url: str | None = None
    join_token: str | None = field(default=None, repr=False)
    #: The interpreter the service runs ``-m edgeos`` with: this one, unresolved, so a
    #: virtual environment's ``bin/python`` keeps its ``site-packages``.
    python: Path = field(default_factory=lambda: Path(sys.executable).absolute())
    restart_sec: int = 5
    stop_timeout_sec: int = 30

    @property
    def unit_group(self) -> str:
        """The group the service runs as."""
        return self.group or self.user


def build_plan(
    *,
    user: str = DEFAULT_USER,
    data_dir: Path = DEFAULT_DATA_DIR,
    memory_max_mb: int | None = None,
    fleet_url: str | None = None,
    join_token: str | None = None,
    root: Path = Path("/"),
) -> ServicePlan:
    """A checked plan; the memory limit comes from the flag, else from ``node.yaml``.

    Raises ConfigError naming every problem with the inputs, before anything is done.
    """
    plan = ServicePlan(
        user=user, data_dir=data_dir, fleet_url=fleet_url, join_token=join_token,
        memory_max_mb=DEFAULT_MEMORY_MAX_MB if memory_max_mb is None else memory_max_mb,
    )  # fmt: skip
    check_plan(plan)
    # What the node will read at start: node.yaml in its data directory. The installer's
    # own EDGEOS_* variables do not reach the service, so they are ignored here.
    settings = load_settings({"data_dir": _inside(root, data_dir)}, environ={})
    file_budget = settings.memory_budget_mb
    if file_budget and memory_max_mb is None:
        return replace(plan, memory_max_mb=file_budget, budget_in_unit=False)
    if file_budget and file_budget > plan.memory_max_mb:
        raise ConfigError(
            f"node.yaml sets memory_budget_mb {file_budget} but --memory-max-mb is "
            f"{plan.memory_max_mb}: the kernel would stop the node before its guard acts; "
            f"give --memory-max-mb {file_budget} or more, or lower memory_budget_mb"
        )
    return replace(plan, budget_in_unit=not file_budget)


def check_plan(plan: ServicePlan) -> None:
    """Raise ConfigError naming every problem with the plan's inputs."""
    problems: list[str] = []
    if not _USER_NAME.match(plan.user):
        problems.append(
            f"--user {plan.user!r} is not a system user name (use 1-31 of a-z 0-9 _ -, "
            "starting with a letter or _)"
        )
    if plan.group is not None and not _USER_NAME.match(plan.group):
        problems.append(f"group {plan.group!r} is not a group name")
    problems += _data_dir_problems(plan.data_dir)
    if plan.memory_max_mb < MIN_MEMORY_MB:
        problems.append(
            f"--memory-max-mb {plan.memory_max_mb} is below the {MIN_MEMORY_MB} MB a node "
            f"needs to start; give {MIN_MEMORY_MB} or more (default {DEFAULT_MEMORY_MAX_MB})"
        )
    problems += _fleet_problems(plan.fleet_url, plan.join_token)
    if not _SAFE_PATH.match(str(plan.python)):
        problems.append(
            f"the interpreter path {plan.python} has characters a unit file would need "
            "quoted; install edgeos under a plain path such as /opt/edgeos"
        )
    if problems:
        raise ConfigError("cannot install the node service: " + "; ".join(problems))


def _data_dir_problems(data_dir: Path) -> list[str]:
    if not data_dir.is_absolute() or not _SAFE_PATH.match(str(data_dir)):
        return [
            f"--data-dir {data_dir} must be an absolute path of letters, digits and . _ - @ + /"
        ]
    if ".." in data_dir.parts or data_dir == Path("/"):
        return [f"--data-dir {data_dir} must name a directory below / without '..'"]
    for prefix, why in _NOT_DATA.items():
        if data_dir == prefix or prefix in data_dir.parents:
            return [f"--data-dir {data_dir} is under {prefix}, and {why}; use e.g. /var/lib/edgeos"]
    return []


def _fleet_problems(url: str | None, token: str | None) -> list[str]:
    if url is None and token is None:
        return []
    if url is None or token is None:
        return ["--fleet and --join-token go together: give both or neither"]
    problems = []
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"--fleet {url!r} is not an http(s) URL with a host")
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        problems.append("--join-token must be printable text without spaces")
    return problems


# -- the unit ---------------------------------------------------------------------------
def render_unit(plan: ServicePlan) -> str:
    """The systemd unit for a checked plan."""
    data = str(plan.data_dir)
    environment = [f"EDGEOS_DATA_DIR={data}"]
    if plan.budget_in_unit:
        environment.append(f"EDGEOS_MEMORY_BUDGET_MB={plan.memory_max_mb}")
    lines = [
        "# Written by `edgeos node install`; remove it with `edgeos node uninstall`.",
        "[Unit]",
        "Description=edgeos node: local models and durable agents",
        "After=network-online.target",
        "Wants=network-online.target",
        "# A node that keeps failing at start stops being restarted after 5 tries in 5 min.",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=exec",
        f"User={plan.user}",
        f"Group={plan.unit_group}",
        f"ExecStart={plan.python} -m edgeos node run --data-dir {data}",
        *(f"Environment={e}" for e in environment),
        f"WorkingDirectory={data}",
        "# Logs go to the journal (journalctl -u edgeos-node), which rotates them.",
        "SyslogIdentifier=edgeos-node",
        "Restart=on-failure",
        f"RestartSec={plan.restart_sec}",
        "# SIGTERM is the node's graceful shutdown; a SIGKILL after the timeout is also safe,",
        "# since every run resumes where it stopped.",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={plan.stop_timeout_sec}",
        f"MemoryMax={plan.memory_max_mb}M",
        "UMask=0027",
        "# Hardening: the node needs no capabilities and writes only its data directory.",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        f"ReadWritePaths={data}",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def unit_path(root: Path = Path("/")) -> Path:
    """Where the unit file lives under ``root``."""
    return _inside(root, UNIT_DIR / UNIT_NAME)


# -- install ----------------------------------------------------------------------------
@dataclass(frozen=True)
class UserInfo:
    """A system user as ``getent passwd`` describes it."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass
class InstallReport:
    """What an install did (or, for a dry run, would do)."""

    unit_path: Path
    unit: str
    steps: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Step:
    text: str  # shown by --dry-run and in errors, shell-like
    needs: str  # what the step needs, said when it fails
    do: Callable[[], None]
    undo: Callable[[], str] | None = None  # returns what it undid
    undo_if_it_fails: bool = False  # the command may have half-happened (enable --now)


def install(
    plan: ServicePlan, root: Path = Path("/"), *, runner: Runner = system_runner
) -> InstallReport:
    """Install, enable and start the node service, or leave the machine as it was.

    ``root`` other than ``/`` installs into a directory tree (for tests; pair it with a
    recording runner): the root user check and the interpreter check are skipped there.
    Raises ConfigError for a bad plan and ServiceError for a precondition or step that
    failed, naming what is needed, after undoing whatever had been done.
    """
    check_plan(plan)
    installer = _Installer(plan, root, runner)
    problems = installer.preflight()
    if problems:
        raise ServiceError("cannot install the node service: " + "; ".join(problems))
    steps = installer.steps()
    done: list[_Step] = []
    for step in steps:
        try:
            step.do()
        except BaseException as exc:  # Ctrl-C too: nothing is left half-installed
            failed = [step] if step.undo_if_it_fails else []
            undone, leftovers = _undo([*done, *failed])
            if not isinstance(exc, ServiceError | OSError):
                raise
            message = f"install failed at `{step.text}`: {exc}. Needed: {step.needs}."
            if undone:
                message += " Undone: " + "; ".join(undone) + "."
            if leftovers:
                message += " Could not undo (do it by hand): " + "; ".join(leftovers) + "."
            raise ServiceError(message) from exc
        done.append(step)
    return InstallReport(
        unit_path(root), installer.unit_text, [s.text for s in steps], installer.notes()
    )


def dry_run(
    plan: ServicePlan, root: Path = Path("/"), *, runner: Runner = system_runner
) -> tuple[InstallReport, list[str]]:
    """What :func:`install` would do, and every precondition that would stop it here.

    Only reads: ``getent`` may run, nothing is written.
    """
    check_plan(plan)
    installer = _Installer(plan, root, runner)
    problems = installer.preflight(stop_without_root=False)
    steps = installer.steps()
    report = InstallReport(
        unit_path(root), installer.unit_text, [s.text for s in steps], installer.notes()
    )
    return report, problems


class _Installer:
    """The checks and steps of one install; steps share what earlier ones found."""

    def __init__(self, plan: ServicePlan, root: Path, runner: Runner) -> None:
        self.plan = plan
        self.root = root
        self.runner = runner
        self.real = root == Path("/")
        self.data = _inside(root, plan.data_dir)
        self.unit = unit_path(root)
        self.user: UserInfo | None = None
        self.unit_text = render_unit(plan)
        self.unit_dirs: list[Path] = []  # directories made for the unit, to remove on undo

    # -- checks, before anything is written ---------------------------------------------
    def preflight(self, *, stop_without_root: bool = True) -> list[str]:
        """Every precondition that does not hold; without root, only that by default."""
        problems = []
        if self.real and os.geteuid() != 0:
            problems.append(
                "installing a system service needs root: run it with sudo "
                "(sudo edgeos node install ...)"
            )
            if stop_without_root:
                return problems
        if not _inside(self.root, Path("/run/systemd/system")).is_dir():
            problems.append(
                "systemd is not running on this machine (no /run/systemd/system); in a "
                f"container run `edgeos node run --data-dir {self.plan.data_dir}` in the "
                "foreground instead"
            )
        if self.unit.exists():
            problems.append(
                f"the service is already installed ({self.unit}); run `edgeos node uninstall "
                "--keep-data` first to install it again"
            )
        if self.real:
            problems += interpreter_problems(self.plan.python, _package_dir())
        self.user = lookup_user(self.runner, self.plan.user)
        if self.user is not None and self.plan.group is None:
            group = self.runner(["getent", "group", str(self.user.gid)])
            name = group.stdout.split(":", 1)[0] if group.returncode == 0 else ""
            self.plan = replace(self.plan, group=name or str(self.user.gid))
            self.unit_text = render_unit(self.plan)
        problems += self._data_problems()
        return problems

    def _data_problems(self) -> list[str]:
        data, shown = self.data, self.plan.data_dir
        if data.exists() and not data.is_dir():
            return [f"--data-dir {shown} exists and is not a directory"]
        if data.is_dir() and any(data.iterdir()):
            owner = data.stat().st_uid
            if self.user is None or owner != self.user.uid:
                return [
                    f"--data-dir {shown} already holds files, and it is not owned by user "
                    f"{self.plan.user}; choose an empty or new directory, or, if it is an "
                    f"edgeos data directory for this service, `chown -R {self.plan.user}: "
                    f"{shown}` first"
                ]
        # The service user must be able to walk down to its directory.
        for parent in _parents_within(data, self.root):
            if parent.exists():
                if not parent.is_dir():
                    where = _outside(self.root, parent)
                    return [f"--data-dir {shown} cannot be made: {where} is not a directory"]
                if not parent.stat().st_mode & stat.S_IXOTH:
                    mode = stat.S_IMODE(parent.stat().st_mode)
                    return [
                        f"user {self.plan.user} could not reach --data-dir {shown}: "
                        f"{_outside(self.root, parent)} is mode {mode:04o} (others may not "
                        "enter); choose a data directory under /var/lib, or `chmod o+x` it"
                    ]
        existing = next((p for p in (data, *_parents_within(data, self.root)) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            return [
                f"--data-dir {shown} cannot be written: {_outside(self.root, existing)} is not "
                "writable (a read-only filesystem?); choose a data directory on a writable one"
            ]
        return []

    # -- steps ----------------------------------------------------------------------------
    def steps(self) -> list[_Step]:
        """The install, step by step, each with its undo."""
        plan, steps = self.plan, []
        if self.user is None:
            steps.append(self._useradd())
        steps.append(
            _Step(
                f"install -d -m 0750 {plan.data_dir}",
                "a data directory root can create on a writable filesystem",
                *self._make_data_dir(),
            )
        )
        own = ["chown", f"{plan.user}:", str(self.data)]
        steps.append(self._command(own, f"user {plan.user} to own {plan.data_dir}"))
        if plan.fleet_url is not None:
            steps += self._fleet_steps()
        steps.append(
            _Step(
                f"write {UNIT_DIR / UNIT_NAME} (mode 0644)",
                f"a writable {UNIT_DIR}",
                self._write_unit,
                self._remove_unit,
            )
        )
        steps.append(self._command(["systemctl", "daemon-reload"], _SYSTEMD_NEEDS))
        enable = self._command(["systemctl", "enable", "--now", UNIT_NAME], _SYSTEMD_NEEDS)
        enable.undo = self._disable
        enable.undo_if_it_fails = True
        steps.append(enable)
        return steps

    def notes(self) -> list[str]:
        """What the operator should know after the install."""
        plan = self.plan
        notes = [
            f"logs: journalctl -u {UNIT_NAME.removesuffix('.service')} (journald rotates them)",
            "state: edgeos node status",
            f"memory: MemoryMax={plan.memory_max_mb}M"
            + (
                f", and the node's own budget EDGEOS_MEMORY_BUDGET_MB={plan.memory_max_mb}"
                if plan.budget_in_unit
                else " (the node's own budget is memory_budget_mb in node.yaml)"
            ),
        ]
        if plan.fleet_url is not None:
            notes.append(
                f"fleet: join request for {plan.fleet_url} stored in "
                f"{plan.data_dir / FLEET_JOIN_FILE} (0600); the node enrolls at its first "
                "start and deletes it"
            )
        return notes

    def _useradd(self) -> _Step:
        name, home = self.plan.user, str(self.plan.data_dir)
        nologin = next(
            (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if _inside(self.root, Path(s)).exists()),
            "/bin/false",
        )  # fmt: skip
        group_exists = self.runner(["getent", "group", name]).returncode == 0
        command = [
            "useradd", "--system", *(["--gid", name] if group_exists else ["--user-group"]),
            "--home-dir", home, "--no-create-home", "--shell", nologin, name,
        ]  # fmt: skip
        step = self._command(
            command, f"a system user {name} (create it yourself, or pass --user of an existing one)"
        )

        def undo() -> str:
            self._run(["userdel", name])
            return f"removed user {name}"

        step.undo = undo
        return step

    def _make_data_dir(self) -> tuple[Callable[[], None], Callable[[], str]]:
        made: list[Path] = []
        before: list[os.stat_result] = []

        def do() -> None:
            if self.data.exists():
                before.append(self.data.stat())
            made.extend(_make_dirs(self.data, self.root))
            self.data.chmod(0o750)

        def undo() -> str:
            if made:
                shutil.rmtree(made[0])
                return f"removed {_outside(self.root, made[0])}"
            os.chmod(self.data, stat.S_IMODE(before[0].st_mode))
            os.chown(self.data, before[0].st_uid, before[0].st_gid)
            return f"gave {self.plan.data_dir} back its owner and mode"

        return do, undo

    def _fleet_steps(self) -> list[_Step]:
        path = self.data / FLEET_JOIN_FILE
        doc = {"url": self.plan.fleet_url, "join_token": self.plan.join_token}

        def undo() -> str:
            path.unlink(missing_ok=True)
            return f"removed {self.plan.data_dir / FLEET_JOIN_FILE}"

        write = _Step(
            f"write {self.plan.data_dir / FLEET_JOIN_FILE} (mode 0600)",
            "a writable data directory",
            lambda: write_atomic(
                path,
                orjson.dumps({**doc, "stored_at": time.time()}, option=orjson.OPT_INDENT_2),
                0o600,
            ),
            undo,
        )
        own = ["chown", f"{self.plan.user}:", str(path)]
        return [write, self._command(own, f"user {self.plan.user} to own the file")]

    def _write_unit(self) -> None:
        self.unit_dirs = _make_dirs(self.unit.parent, self.root)  # only in a bare test root
        write_atomic(self.unit, self.unit_text.encode(), 0o644)

    def _remove_unit(self) -> str:
        self.unit.unlink(missing_ok=True)
        for made in reversed(self.unit_dirs):
            made.rmdir()
        # Best effort: systemd forgets the unit; if it never heard of it, no harm.
        self.runner(["systemctl", "daemon-reload"])
        return f"removed {UNIT_DIR / UNIT_NAME}"

    def _disable(self) -> str:
        self._run(["systemctl", "disable", "--now", UNIT_NAME])
        return f"disabled and stopped {UNIT_NAME}"

    def _command(self, command: list[str], needs: str) -> _Step:
        return _Step(shlex.join(command), needs, lambda: self._run(command))

    def _run(self, command: Sequence[str]) -> None:
        result = self.runner(command)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            why = detail[-1] if detail else "no output"
            raise ServiceError(f"exit status {result.returncode} ({why})")


_SYSTEMD_NEEDS = (
    "a running systemd that accepts the unit (see `systemctl status edgeos-node` and "
    "`journalctl -u edgeos-node`)"
)


def _undo(steps: list[_Step]) -> tuple[list[str], list[str]]:
    """Undo steps, last first; what was undone, and what could not be."""
    undone, leftovers = [], []
    for step in reversed(steps):
        if step.undo is None:
            continue
        try:
            undone.append(step.undo())
        except (ServiceError, OSError) as exc:
            leftovers.append(f"{step.text} ({exc})")
    return undone, leftovers


def lookup_user(runner: Runner, name: str) -> UserInfo | None:
    """The system user ``name``, or None when there is none (``getent`` exit 2)."""
    result = runner(["getent", "passwd", name])
    if result.returncode == 2:
        return None
    if result.returncode != 0:
        raise ServiceError(
            f"cannot look up user {name}: getent exit status {result.returncode} "
            f"({result.stderr.strip() or 'no output'}); needed: getent from the C library"
        )
    fields = result.stdout.strip().split(":")
    if len(fields) < 7:
        raise ServiceError(f"getent passwd {name} answered {result.stdout.strip()!r}")
    return UserInfo(fields[0], int(fields[2]), int(fields[3]), fields[5])


def interpreter_problems(python: Path, package_dir: Path) -> list[str]:
    """Why the service could not run edgeos from where it is installed (empty: it can)."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        return [f"the interpreter {python} is not an executable file"]
    problems = []
    for what, path in (
        ("the interpreter", python),
        ("the interpreter's real file", python.resolve()),
        ("the edgeos package", package_dir),
    ):
        for prefix, why in _HIDDEN.items():
            if prefix in path.parents:
                problems.append(
                    f"{what} is {path}, under {prefix}, and {why}; install edgeos outside home "
                    "and temporary directories (e.g. `python3 -m venv /opt/edgeos && "
                    "/opt/edgeos/bin/pip install edgeos`) and run that edgeos's `node install`"
                )
                break
        else:
            closed = [p for p in path.parents if p.is_dir() and not p.stat().st_mode & stat.S_IXOTH]
            if closed:
                problems.append(
                    f"{what} is {path}, but {closed[-1]} lets no other user in; the service "
                    f"user could not run it (`chmod o+x {closed[-1]}`, or install edgeos "
                    "under /opt)"
                )
    return list(dict.fromkeys(problems))


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


# -- uninstall --------------------------------------------------------------------------
@dataclass
class UninstallReport:
    """What an uninstall did."""

    steps: list[str]
    data_dir: Path | None
    data_kept: bool


def uninstall(
    root: Path = Path("/"), *, keep_data: bool, runner: Runner = system_runner
) -> UninstallReport:
    """Stop, disable and remove the service; remove its data and user unless ``keep_data``.

    The data directory and user are read from the installed unit. Raises NotFoundError
    when no unit is installed, ServiceError when a step fails (saying what was done).
    """
    real = root == Path("/")
    if real and os.geteuid() != 0:
        raise ServiceError(
            "removing a system service needs root: run it with sudo (sudo edgeos node uninstall)"
        )
    path = unit_path(root)
    if not path.exists():
        raise NotFoundError(f"the node service is not installed here (no {path})")
    user, data_dir = _unit_facts(path.read_text(encoding="utf-8"))
    done: list[str] = []

    def run(command: list[str], *, check: bool = True) -> None:
        result = runner(command)
        if check and result.returncode != 0:
            why = (result.stderr or result.stdout).strip() or "no output"
            so_far = f" (done so far: {'; '.join(done)})" if done else " (nothing was changed)"
            raise ServiceError(
                f"uninstall failed at `{shlex.join(command)}`: exit status "
                f"{result.returncode} ({why}){so_far}. Needed: a running systemd; without "
                f"one, remove {UNIT_DIR / UNIT_NAME} by hand"
            )
        done.append(shlex.join(command))

    run(["systemctl", "disable", "--now", UNIT_NAME])
    path.unlink()
    done.append(f"remove {UNIT_DIR / UNIT_NAME}")
    run(["systemctl", "daemon-reload"])
    run(["systemctl", "reset-failed", UNIT_NAME], check=False)  # fails if it never failed
    if keep_data or data_dir is None:
        return UninstallReport(done, data_dir, data_kept=True)
    if _data_dir_problems(data_dir):  # never rmtree a path the unit should not have had
        raise ServiceError(f"the unit names {data_dir} as data directory; not removing it")
    data = _inside(root, data_dir)
    if data.exists():
        shutil.rmtree(data)
        done.append(f"remove {data_dir}")
    info = lookup_user(runner, user) if user else None
    # Only a user this installer made (its home is the data directory) is removed.
    if info is not None and Path(info.home) == data_dir:
        run(["userdel", info.name])
    return UninstallReport(done, data_dir, data_kept=False)


def _unit_facts(text: str) -> tuple[str | None, Path | None]:
    """The service user and data directory written in a unit."""
    user = data = None
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "User":
            user = value
        elif key == "Environment" and value.startswith("EDGEOS_DATA_DIR="):
            data = Path(value.removeprefix("EDGEOS_DATA_DIR="))
    return user, data


# -- files ------------------------------------------------------------------------------
def _inside(root: Path, path: Path) -> Path:
    """``path`` (absolute, as the service sees it) inside the tree at ``root``."""
    return root / path.relative_to("/")


def _outside(root: Path, path: Path) -> Path:
    """The reverse of :func:`_inside`: how the service will see ``path``."""
    return Path("/") / path.relative_to(root)


def _parents_within(path: Path, root: Path) -> list[Path]:
    """Ancestors of ``path`` below ``root``, nearest first."""
    return [p for p in path.parents if p != root and root in p.parents]


def _make_dirs(path: Path, root: Path) -> list[Path]:
    """Make ``path`` and its missing parents, 0755 whatever the umask; those made, top first."""
    missing = [p for p in (path, *_parents_within(path, root)) if not p.exists()]
    missing.reverse()
    for made in missing:
        made.mkdir()
        made.chmod(0o755)
    return missing
