"""The deployment files (systemd units, Mosquitto config and ACL, docker-compose, the testbed broker) agree with
the code: console scripts, state/MPS directories, the v1 topic tree and the chunk size.

The ACL is checked both literally (which rules exist) and by evaluating it the way Mosquitto 2.x's default ACL
check does (per-user rules first, then `pattern` rules, which apply to EVERY authenticated user).
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from agent.config import AgentConfig
from agent.mps import CONTROL, MpsConfig
from aggregator.config import AggregatorConfig, TransferConfig
from protocol import topics
from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.schemas import Chunk, encode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
BROKER_DIR = REPO / "broker_config"
UNIT_FILES = sorted(SYSTEMD_DIR.glob("*.service"))
AGENT_UNIT = SYSTEMD_DIR / "fedmt-agent.service"
AGGREGATOR_UNIT = SYSTEMD_DIR / "fedmt-aggregator.service"
MPS_UNIT = SYSTEMD_DIR / "nvidia-mps.service"
CONTAINER_CONFIG_DIR = "/mosquitto/config"

# Which device channels the agent publishes and which the aggregator publishes for it (protocol/topics.py).
AGENT_WRITES = ("status", "profile", "telemetry", "events")
AGENT_READS = ("receipts",)  # and its schedules, one per task (topics.schedule)


def _field_default(struct: type, name: str):
    field = next(f for f in msgspec.structs.fields(struct) if f.name == name)
    return field.default if field.default is not msgspec.NODEFAULT else field.default_factory()


# --- systemd unit parsing -------------------------------------------------------------------------------


class _MultiDict(dict):
    """configparser stores each option as a list while reading; extend instead of replace on repeats, so that
    repeated systemd keys (Environment=, ExecStartPre=, ...) keep every value."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and isinstance(self.get(key), list):
            super().__getitem__(key).extend(value)
        else:
            super().__setitem__(key, value)


def load_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; an empty assignment resets the list, as in systemd."""
    parser = configparser.ConfigParser(
        strict=False,
        interpolation=None,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        dict_type=_MultiDict,
        default_section="\0none",
    )
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    unit: dict[str, dict[str, list[str]]] = {}
    for section in parser.sections():
        entries: dict[str, list[str]] = {}
        for key in parser[section]:
            values: list[str] = []
            for value in parser.get(section, key, raw=True).split("\n"):
                value = value.strip()
                values = values + [value] if value else []
            entries[key] = values
        unit[section] = entries
    return unit


def values(unit: dict, key: str, section: str = "Service") -> list[str]:
    return unit.get(section, {}).get(key, [])


def single(unit: dict, key: str, section: str = "Service") -> str | None:
    found = values(unit, key, section)
    return found[-1] if found else None


def words(unit: dict, key: str, section: str = "Service") -> list[str]:
    """Space-separated list settings (RuntimeDirectory=, ReadWritePaths=, After=), all assignments joined."""
    return [w for value in values(unit, key, section) for w in shlex.split(value)]


def environment(unit: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values(unit, "Environment"):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "yes", "true", "on")


def exec_argv(value: str) -> list[str]:
    argv = shlex.split(value)
    argv[0] = argv[0].lstrip("-@:+!")
    return argv


def exec_binaries(unit: dict) -> set[str]:
    return {
        exec_argv(v)[0]
        for key, vals in unit.get("Service", {}).items()
        if key.startswith("Exec")
        for v in vals
    }


def strip_path_prefix(path: str) -> str:
    return path.lstrip("-+")


# --- 1. systemd-analyze verify ----------------------------------------------------------------------------

_MISSING_EXEC = re.compile(
    r"^(?P<unit>\S+): Command (?P<path>\S+) is not executable: No such file or directory$"
)


def _verify(unit_path: Path) -> tuple[int, list[str]]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (install systemd to verify the unit files)")
    help_text = subprocess.run(
        [analyze, "--help"], check=False, capture_output=True, text=True, timeout=30
    ).stdout
    cmd = [analyze, "verify", "--man=no"]
    if "--recursive-errors" in help_text:  # systemd >= 250: do not report problems of the host's other units
        cmd.append("--recursive-errors=no")
    env = {
        **os.environ,
        "SYSTEMD_LOG_LEVEL": "info",  # an inherited err/crit level would hide the warnings we look for
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_LOCATION": "0",
        "SYSTEMD_LOG_TIME": "0",
        "SYSTEMD_LOG_TARGET": "console",
        "SYSTEMD_PAGER": "cat",
    }
    proc = subprocess.run(
        cmd + [str(unit_path)], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, lines


def _unacceptable(unit_path: Path, lines: list[str]) -> list[str]:
    """Output lines other than 'Command <an Exec*= binary of this unit> is not executable: No such file...'
    (the binaries are installed on the target, not here)."""
    binaries = exec_binaries(load_unit(unit_path))
    bad = []
    for line in lines:
        match = _MISSING_EXEC.match(line)
        if not (match and match["unit"] == unit_path.name and match["path"] in binaries):
            bad.append(line)
    return bad


@pytest.mark.parametrize("unit_path", UNIT_FILES, ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_unit(unit_path):
    rc, lines = _verify(unit_path)
    bad = _unacceptable(unit_path, lines)
    assert not bad, "systemd-analyze verify complained:\n" + "\n".join(bad)
    assert rc == 0 or lines, f"systemd-analyze verify exited {rc} without saying why"


def test_systemd_analyze_verify_harness_catches_a_typo(tmp_path):
    """The filter above must not swallow real problems (e.g. a misspelt PrivateDevices=)."""
    broken = tmp_path / "fedmt-broken.service"
    broken.write_text(
        "[Unit]\nDescription=x\n\n[Service]\nExecStart=/opt/none/bin/x run\nPrivateDevice=yes\n"
    )
    _, lines = _verify(broken)
    bad = _unacceptable(broken, lines)
    assert any("PrivateDevice" in line for line in bad), lines
    assert not any("is not executable" in line for line in bad), lines


MAX_EXPOSURE = 5.0  # systemd-analyze security: below 5 is "OK" (issue 10)
_EXPOSURE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<level>\d+(\.\d+)?)")


def exposure(unit_path: Path) -> float:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat"},
    )
    match = _EXPOSURE.search(proc.stdout + proc.stderr)
    assert match and match["unit"] == unit_path.name, proc.stdout + proc.stderr
    return float(match["level"])


@pytest.mark.parametrize("unit_path", [AGENT_UNIT, AGGREGATOR_UNIT], ids=lambda p: p.name)
def test_daemon_units_are_sandboxed_below_exposure_5(unit_path):
    assert exposure(unit_path) < MAX_EXPOSURE


def test_exposure_harness_scores_an_unhardened_unit_as_exposed(tmp_path):
    bare = tmp_path / "fedmt-bare.service"
    bare.write_text("[Service]\nExecStart=/opt/none/bin/x run\n")
    assert exposure(bare) > MAX_EXPOSURE


def test_there_are_the_three_units():
    assert {p.name for p in UNIT_FILES} == {
        "fedmt-agent.service",
        "fedmt-aggregator.service",
        "nvidia-mps.service",
    }


# --- 2. unit contents against the code ------------------------------------------------------------------


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize(
    ("unit_path", "package", "config_struct"),
    [(AGENT_UNIT, "agent", AgentConfig), (AGGREGATOR_UNIT, "aggregator", AggregatorConfig)],
    ids=["agent", "aggregator"],
)
def test_exec_start_runs_the_console_script_with_run_config(monkeypatch, unit_path, package, config_struct):
    unit = load_unit(unit_path)
    starts = values(unit, "ExecStart")
    assert len(starts) == 1, starts
    argv = exec_argv(starts[0])
    script = Path(argv[0]).name
    scripts = _scripts()
    assert script in scripts, f"{argv[0]} is not a [project.scripts] entry ({sorted(scripts)})"
    target = scripts[script]
    assert target.split(".")[0] == package, f"{script} -> {target}, expected a {package}.* entry point"
    assert Path(argv[0]).is_absolute()
    assert argv[1:3] == ["run", "--config"] and len(argv) == 4, argv
    assert Path(argv[3]).is_absolute() and argv[3].endswith(".toml"), argv[3]

    # The argv parses with the real CLI and dispatches to its `run` command with that config file.
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    seen = []
    monkeypatch.setitem(module.COMMANDS, "run", lambda args: seen.append(args) or 0)
    assert getattr(module, func_name)(argv[1:]) == 0
    assert [a.config for a in seen] == [argv[3]]


@pytest.mark.parametrize(
    ("unit_path", "config_struct"),
    [(AGENT_UNIT, AgentConfig), (AGGREGATOR_UNIT, AggregatorConfig)],
    ids=["agent", "aggregator"],
)
def test_state_directory_is_the_config_default(unit_path, config_struct):
    state_dirs = words(load_unit(unit_path), "StateDirectory")
    default = Path(_field_default(config_struct, "state_dir"))
    assert state_dirs == [default.name]
    assert (
        default == Path("/var/lib") / state_dirs[0]
    )  # where systemd creates StateDirectory= (and chowns it)


def test_mps_directories_match_mps_config_and_the_mps_daemon():
    mps = MpsConfig()
    agent_env = environment(load_unit(AGENT_UNIT))
    daemon_env = environment(load_unit(MPS_UNIT))
    expected = {"CUDA_MPS_PIPE_DIRECTORY": mps.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": mps.log_dir}
    for name, value in expected.items():
        assert agent_env.get(name) == value, f"fedmt-agent.service {name}"
        assert daemon_env.get(name) == value, f"nvidia-mps.service {name}"
    # fedmt-agent runs with PrivateTmp=yes: a pipe dir in /tmp would not be the daemon's.
    for path in expected.values():
        assert not Path(path).is_relative_to("/tmp"), path


def test_mps_unit_creates_both_directories():
    mps = MpsConfig()
    runtime = {Path("/run") / d for d in words(load_unit(MPS_UNIT), "RuntimeDirectory")}
    assert {Path(mps.pipe_dir), Path(mps.log_dir)} <= runtime, runtime


def test_mps_daemon_runs_as_the_agent_user():
    """One MPS server per UID: clients of another UID queue behind it."""
    agent, daemon = load_unit(AGENT_UNIT), load_unit(MPS_UNIT)
    assert single(agent, "User") and single(agent, "User") == single(daemon, "User")
    assert single(agent, "Group") == single(daemon, "Group")
    assert not is_true(single(agent, "DynamicUser")) and not is_true(single(daemon, "DynamicUser"))


def test_mps_unit_runs_the_control_binary_the_agent_uses():
    unit = load_unit(MPS_UNIT)
    assert Path(exec_argv(single(unit, "ExecStart"))[0]).name == CONTROL
    assert Path(exec_argv(single(unit, "ExecStart"))[0]).is_absolute()
    assert "fedmt-agent.service" in words(unit, "Before", "Unit")
    assert "nvidia-mps.service" in words(load_unit(AGENT_UNIT), "After", "Unit")


def test_agent_unit_keeps_gpu_devices_and_stops_cooperatively():
    unit = load_unit(AGENT_UNIT)
    assert not is_true(single(unit, "PrivateDevices")), "PrivateDevices=yes hides /dev/nvidia*"
    assert not values(unit, "DevicePolicy") or single(unit, "DevicePolicy") == "auto"
    assert single(unit, "KillMode") == "mixed"


def test_agent_unit_may_write_the_mps_directories_and_starts_without_them():
    """A "-" prefix: hosts without MPS (CPU hosts, Jetsons) have no such directory, and systemd refuses to
    start a unit whose ReadWritePaths= is missing unless the path is marked optional."""
    mps = MpsConfig()
    paths = words(load_unit(AGENT_UNIT), "ReadWritePaths")
    for path in (mps.pipe_dir, mps.log_dir):
        covering = [p for p in paths if Path(path).is_relative_to(strip_path_prefix(p))]
        assert covering, (path, paths)
        assert all(p.startswith("-") for p in covering), f"{covering}: not optional"


@pytest.mark.parametrize("unit_path", [AGENT_UNIT, AGGREGATOR_UNIT], ids=lambda p: p.name)
def test_daemon_units_wait_for_ready_and_watch_the_main_loop(unit_path):
    """Type=notify with a watchdog: common.daemon.SystemdNotifier says READY=1 from the main loop and pings at
    half of WatchdogSec=; both loops pass at least every 0.5 s when idle."""
    unit = load_unit(unit_path)
    assert single(unit, "Type") == "notify"
    assert single(unit, "NotifyAccess") in (None, "main")
    watchdog = single(unit, "WatchdogSec")
    assert watchdog and watchdog.isdigit() and int(watchdog) >= 10, watchdog
    assert single(unit, "Restart") == "on-failure"  # a watchdog timeout restarts the daemon


def test_agent_unit_joins_the_jetson_gpu_group_and_no_group_a_host_may_lack():
    """systemd refuses to start a unit that names a group the host lacks: only video, which every Debian,
    Ubuntu and Jetson L4T system has (/dev/nvhost-*, /dev/nvmap on a Jetson). jtop's group exists only where
    jetson-stats is installed: the README adds the user to it there (a User='s own groups apply)."""
    assert words(load_unit(AGENT_UNIT), "SupplementaryGroups") == ["video"]
    assert words(load_unit(AGGREGATOR_UNIT), "SupplementaryGroups") == []


@pytest.mark.parametrize("unit_path", [AGENT_UNIT, AGGREGATOR_UNIT], ids=lambda p: p.name)
def test_daemon_units_run_as_a_fixed_user_that_can_be_given_its_key_file(unit_path):
    """DynamicUser= gets a fresh UID that no file in /etc/fedmt can be made readable by; a fixed system user
    reads its TLS key or password file through group permissions (README, "Running as services")."""
    unit = load_unit(unit_path)
    assert not is_true(single(unit, "DynamicUser"))
    assert single(unit, "User") not in (None, "root") and single(unit, "Group")


# --- 3. the Mosquitto ACL ------------------------------------------------------------------------------

READ, WRITE = 1, 2
ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}


def load_acl(path: Path = BROKER_DIR / "acl") -> list[tuple[str, str | None, int, str]]:
    """(kind 'topic'|'pattern', user or None, access bits, topic) as Mosquitto 2.x's acl_file parser reads it."""
    rules = []
    user = None
    for line in path.read_text().splitlines():
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        token, _, rest = line.strip().partition(" ")
        rest = rest.lstrip(" ")
        if token == "user":
            assert rest, f"acl: user without a name: {line!r}"
            user = rest
        elif token in ("topic", "pattern"):
            access_s, _, topic = rest.partition(" ")
            if not topic.strip():
                access_s, topic = "readwrite", access_s
            assert access_s in ACCESS, f"acl: invalid access {access_s!r} in {line!r}"
            rules.append((token, user if token == "topic" else None, ACCESS[access_s], topic.lstrip(" ")))
        else:
            pytest.fail(f"acl: unknown directive in {line!r}")
    return rules


def topic_matches(sub: str, topic: str) -> bool:
    sub_levels, topic_levels = sub.split("/"), topic.split("/")
    for i, level in enumerate(sub_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(sub_levels) == len(topic_levels)


def allowed(rules, username: str, topic: str, access: int) -> bool:
    """Mosquitto 2.x default ACL check for a message (publish: WRITE, delivery: READ): the user's own rules,
    denials first, then every `pattern` rule with %u/%c substituted; nothing matching means denied."""
    if re.search(r"[+#]", username):
        return False

    def check(candidates):
        for _, _, rule_access, rule_topic in sorted(candidates, key=lambda r: r[2] != 0):
            if topic.startswith("$") and not rule_topic.startswith("$"):
                continue
            if topic_matches(rule_topic, topic):
                if rule_access == 0:
                    return False
                if access & rule_access:
                    return True
        return None

    own = check([r for r in rules if r[0] == "topic" and r[1] == username])
    if own is not None:
        return own
    if "/" in username:
        return False
    patterns = [
        (k, u, a, t.replace("%u", username).replace("%c", username)) for k, u, a, t in rules if k == "pattern"
    ]
    return bool(check(patterns))


DEV, OTHER, TASK = "jetson-01", "jetson-02", "cifar10"


def _update_topics(device_id: str) -> list[str]:
    base = topics.update(TASK, device_id)
    return [topics.manifest(base), topics.chunk(base, 0), topics.chunk(base, 1234)]


def _global_topics() -> list[str]:
    base = topics.global_model(TASK)
    return [topics.manifest(base), topics.chunk(base, 0), topics.chunk(base, 1234)]


def _device_topics(device_id: str) -> list[str]:
    return [topics.device(device_id, leaf) for leaf in topics.DEVICE_LEAVES] + [
        topics.schedule(device_id, TASK)
    ]


def test_every_device_leaf_has_a_direction():
    assert sorted(AGENT_WRITES + AGENT_READS) == sorted(topics.DEVICE_LEAVES)


@pytest.mark.parametrize("leaf", AGENT_WRITES)
def test_acl_has_pattern_write_for_each_device_written_channel(leaf):
    rules = load_acl()
    assert ("pattern", None, WRITE, f"{topics.PREFIX}/devices/%u/{leaf}") in rules
    assert allowed(rules, DEV, topics.device(DEV, leaf), WRITE)


def test_acl_has_pattern_write_for_own_update_transfers():
    rules = load_acl()
    assert ("pattern", None, WRITE, f"{topics.PREFIX}/tasks/+/updates/%u/#") in rules
    for topic in _update_topics(DEV):
        assert allowed(rules, DEV, topic, WRITE), topic


@pytest.mark.parametrize("leaf", AGENT_READS)
def test_acl_has_pattern_read_for_each_device_read_channel(leaf):
    rules = load_acl()
    assert ("pattern", None, READ, f"{topics.PREFIX}/devices/%u/{leaf}") in rules
    assert allowed(rules, DEV, topics.device(DEV, leaf), READ)


def test_acl_lets_a_device_read_its_own_task_schedules_only():
    rules = load_acl()
    assert ("pattern", None, READ, f"{topics.PREFIX}/devices/%u/schedule/+") in rules
    assert allowed(rules, DEV, topics.schedule(DEV, TASK), READ)
    assert not allowed(rules, DEV, topics.schedule(DEV, TASK), WRITE)
    assert not allowed(rules, DEV, topics.schedule(OTHER, TASK), READ)


def test_acl_lets_devices_read_global_models():
    rules = load_acl()
    assert ("pattern", None, READ, f"{topics.PREFIX}/tasks/+/global/#") in rules
    for topic in _global_topics():
        assert allowed(rules, DEV, topic, READ), topic


def test_no_pattern_grants_write_beyond_the_devices_own_upload_channels():
    for kind, _, access, topic in load_acl():
        if kind != "pattern" or not access & WRITE:
            continue
        levels = topic.split("/")
        assert "global" not in levels, topic
        assert not {"schedule", "receipts"} & set(levels), topic
        assert "#" not in levels[:-1] and topic.startswith(f"{topics.PREFIX}/"), topic
        if levels[2] == "devices":
            assert levels[3] == "%u" and levels[4] in AGENT_WRITES, topic
        else:
            assert levels[2:4] == ["tasks", "+"] and levels[4:6] == ["updates", "%u"], topic


def test_device_cannot_write_other_devices_or_aggregator_topics():
    rules = load_acl()
    forbidden = (
        _device_topics(OTHER)
        + _update_topics(OTHER)
        + _global_topics()
        + [topics.device(DEV, leaf) for leaf in AGENT_READS]
        + [topics.schedule(DEV, TASK)]
        + [f"{topics.PREFIX}/devices/{DEV}/other", "$SYS/broker/uptime"]
    )
    for topic in forbidden:
        assert not allowed(rules, DEV, topic, WRITE), topic


def test_device_cannot_read_other_devices_topics():
    rules = load_acl()
    for topic in _device_topics(OTHER) + _update_topics(OTHER):
        assert not allowed(rules, DEV, topic, READ), topic


def emqx_rule_topics(permission: str, who: str, action: str) -> set[str]:
    """The topics of broker_config/emqx/acl.conf's rules `{permission, who, action, [topics]}.`"""
    text = (BROKER_DIR / "emqx" / "acl.conf").read_text()
    pattern = rf"\{{{permission}, {re.escape(who)}, {re.escape(action)}, \[(.*?)\]\}}\."
    return {t for block in re.findall(pattern, text, re.DOTALL) for t in re.findall(r'"([^"]+)"', block)}


def test_the_emqx_acl_gives_devices_what_the_mosquitto_acl_gives_them_and_retains_only_birth_messages():
    device = {
        (access, topic.replace("%u", "${username}"))
        for kind, _, access, topic in load_acl()
        if kind == "pattern"
    }
    assert emqx_rule_topics("allow", "all", "publish") == {t for access, t in device if access == WRITE}
    assert emqx_rule_topics("allow", "all", "subscribe") == {t for access, t in device if access == READ}
    retained = emqx_rule_topics("allow", "all", "{publish, [{retain, true}]}")
    assert retained == {
        f"{topics.PREFIX}/devices/${{username}}/{leaf}" for leaf in topics.RETAINED_BY_DEVICES
    }
    assert emqx_rule_topics("deny", "all", "{publish, [{retain, true}]}") == {"#"}


def test_acl_topics_reference_only_existing_device_leaves_and_transfer_kinds():
    for _, _, _, topic in load_acl():
        if topic.startswith("$SYS/"):
            continue
        assert topic.startswith(f"{topics.PREFIX}/"), topic
        levels = topic.split("/")
        if len(levels) > 2 and levels[2] == "devices":
            match = re.fullmatch(
                rf"{re.escape(topics.PREFIX)}/devices/[^/]+/(?P<leaf>[^/]+)(?P<task>/\+)?", topic
            )
            assert match, topic
            leaves = (topics.SCHEDULE,) if match["task"] else topics.DEVICE_LEAVES + ("#", "+")
            assert match["leaf"] in leaves, topic
        elif len(levels) > 2 and levels[2] == "tasks":
            assert len(levels) >= 5 and levels[4] in ("global", "updates"), topic
        else:
            assert levels[2:] == ["#"], topic


@pytest.mark.parametrize("aggregator", ["aggregator", "aggregator-2"])
def test_each_aggregator_identity_owns_the_whole_tree(aggregator):
    rules = load_acl()
    assert ("topic", aggregator, READ | WRITE, f"{topics.PREFIX}/#") in rules
    every = _device_topics(DEV) + _update_topics(DEV) + _global_topics()
    for topic in every:
        assert allowed(rules, aggregator, topic, READ) and allowed(rules, aggregator, topic, WRITE), topic
    assert _field_default(AggregatorConfig, "mqtt").username == "aggregator"


@pytest.mark.parametrize("observer", ["monitor", "auditor"])
def test_observer_rules_are_read_only(observer):
    rules = load_acl()
    own = [r for r in rules if r[0] == "topic" and r[1] == observer]
    assert own and all(access in (READ, 0) for _, _, access, _ in own), own  # read or deny
    for topic in _device_topics(DEV) + _update_topics(DEV) + _global_topics():
        assert not allowed(rules, observer, topic, WRITE), topic


def test_monitor_reads_device_channels_and_global_models_but_no_update():
    rules = load_acl()
    for topic in _device_topics(DEV) + _global_topics():
        assert allowed(rules, "monitor", topic, READ), topic
    for topic in _update_topics(DEV) + _update_topics("monitor"):
        assert not allowed(rules, "monitor", topic, READ), topic


def test_auditor_reads_the_whole_tree_updates_included():
    rules = load_acl()
    for topic in _device_topics(DEV) + _update_topics(DEV) + _global_topics():
        assert allowed(rules, "auditor", topic, READ), topic


@pytest.mark.parametrize("observer", ["monitor", "auditor"])
def test_observers_cannot_publish_anything(observer):
    rules = load_acl()
    for topic in _device_topics(observer) + _update_topics(observer):
        assert not allowed(rules, observer, topic, WRITE), topic


def test_acl_evaluator_follows_mosquitto_semantics():
    """Self-check of `allowed`: patterns apply to every user, user denials win, wildcard ids are refused."""
    rules = [
        ("topic", "u", READ, "a/#"),
        ("topic", "u", 0, "a/secret"),
        ("pattern", None, WRITE, "d/%u/x"),
    ]
    assert allowed(rules, "u", "a/b", READ) and not allowed(rules, "u", "a/b", WRITE)
    assert not allowed(rules, "u", "a/secret", READ)
    assert allowed(rules, "u", "d/u/x", WRITE) and allowed(rules, "v", "d/v/x", WRITE)
    assert not allowed(rules, "v", "d/u/x", WRITE) and not allowed(rules, "+", "d/+/x", WRITE)
    assert topic_matches("a/#", "a") and not topic_matches("a/+", "a/b/c") and topic_matches("+/b", "a/b")


# --- 4. mosquitto.conf and docker-compose.yml ------------------------------------------------------------


def load_mosquitto_conf(text: str) -> dict[str, list[str]]:
    conf: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        conf.setdefault(key, []).append(value.strip())
    return conf


def _conf() -> dict[str, list[str]]:
    return load_mosquitto_conf((BROKER_DIR / "mosquitto.conf").read_text())


def required_message_size() -> int:
    """The largest chunk message an agent or the aggregator publishes with the default chunk size."""
    chunk = Chunk(
        transfer="t" * 128,
        index=(1 << 32) - 1,
        total=1 << 32,
        chunk_size=DEFAULT_CHUNK_SIZE,
        size=1 << 40,
        sha256="f" * 64,
        data=bytes(DEFAULT_CHUNK_SIZE),
    )
    return max(len(encode(chunk)), DEFAULT_CHUNK_SIZE + 1024)


#: what keeps one client from exhausting the broker: packet size, per-client queue and the broker's heap
BROKER_LIMITS = ("max_packet_size", "max_queued_messages", "max_queued_bytes", "memory_limit")


def message_limit(conf: dict[str, list[str]]) -> int:
    """The largest MQTT packet the broker takes (message_size_limit is deprecated in Mosquitto 2.x)."""
    assert "message_size_limit" not in conf, "message_size_limit is deprecated: use max_packet_size"
    assert "max_packet_size" in conf, "max_packet_size is not set (chunks need a limit, and clients one too)"
    return int(conf["max_packet_size"][-1])


def _check_secure(conf: dict[str, list[str]], config_dir: str) -> None:
    assert conf["allow_anonymous"][-1] == "false"
    assert (
        conf.get("per_listener_settings", ["false"])[-1] == "false"
    )  # else acl/password would not apply globally
    assert conf["acl_file"][-1] == f"{config_dir}/acl"
    assert conf["password_file"][-1] == f"{config_dir}/passwd"
    assert conf["persistence"][-1] == "true"
    assert message_limit(conf) >= required_message_size(), (message_limit(conf), required_message_size())
    for key in BROKER_LIMITS:
        assert int(conf[key][-1]) > 0, (
            f"{key} must be set and positive: without it one client can exhaust the broker"
        )


def test_mosquitto_conf_is_authenticated_persistent_and_fits_chunks():
    conf = _conf()
    _check_secure(conf, CONTAINER_CONFIG_DIR)
    assert conf["persistence_location"][-1].rstrip("/") == "/mosquitto/data"
    assert "message_size_limit" not in conf  # deprecated in Mosquitto 2.x: max_packet_size
    assert conf["set_tcp_nodelay"] == ["true"]  # no Nagle wait on acknowledgements and receipts


def _listeners() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The shipped config's settings before any listener, and {listener line: {option: value}}."""
    from testbed.broker import shipped_sections

    common, blocks = shipped_sections((BROKER_DIR / "mosquitto.conf").read_text())
    return common, {block[0]: dict(line.split(" ", 1) for line in block[1:]) for block in blocks}


def _is_tls(options: dict[str, str]) -> bool:
    return "certfile" in options


def test_mosquitto_conf_serves_devices_over_mutual_tls_with_the_certificate_as_identity():
    _, listeners = _listeners()
    tls = [options for options in listeners.values() if _is_tls(options)]
    assert len(tls) == 1, listeners
    (options,) = tls
    certs = f"{CONTAINER_CONFIG_DIR}/certs"
    assert {options[k] for k in ("cafile", "certfile", "keyfile")} == {
        f"{certs}/ca.crt",
        f"{certs}/server.crt",
        f"{certs}/server.key",
    }  # what scripts/provision-certs.sh writes
    assert options.get("require_certificate") == "true"
    assert options.get("use_identity_as_username") == "true"  # the CN is the username the ACL's %u sees


def test_mosquitto_conf_plain_listener_is_for_the_brokers_own_host_only():
    _, listeners = _listeners()
    for line, options in listeners.items():
        if not _is_tls(options):
            assert line.split()[2:] == ["127.0.0.1"], f"{line}: a password listener open to the network"


def test_every_listener_binds_the_client_id_to_the_username():
    """Mosquitto 2.0 keeps use_username_as_clientid per listener; before any `listener` line it silently opens
    a default listener on port 1883, on every interface, instead."""
    common, listeners = _listeners()
    assert all(options.get("use_username_as_clientid") == "true" for options in listeners.values()), listeners
    assert not [line for line in common if line.startswith("use_username_as_clientid")]


def test_mosquitto_limit_admits_the_largest_configurable_chunk():
    largest = _largest_chunk_size()
    assert message_limit(_conf()) >= largest + 1024


@pytest.mark.broker
def test_shipped_mosquitto_conf_starts_with_the_local_binary_and_enforces_its_packet_limit(tmp_path):
    """The shipped file, as the testbed runs it (its localhost password listener, paths moved here), runs under
    the local mosquitto without warnings; a chunk-sized publish passes, a packet over max_packet_size disconnects
    its sender."""
    import paho.mqtt.client as mqtt

    from testbed.broker import Mosquitto

    with Mosquitto(tmp_path, {"aggregator": "secret"}, use_docker=False) as broker:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aggregator", protocol=mqtt.MQTTv311)
        client.username_pw_set("aggregator", "secret")
        disconnected = threading.Event()
        client.on_disconnect = lambda *args: disconnected.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        limit = message_limit(_conf())
        client.publish("fedmt/v1/tasks/t/global/chunks/0", bytes(DEFAULT_CHUNK_SIZE), qos=1).wait_for_publish(
            10
        )
        assert not disconnected.is_set()
        client.publish("fedmt/v1/tasks/t/global/chunks/1", bytes(limit), qos=1)
        assert disconnected.wait(10), "a packet over max_packet_size was accepted"
        client.loop_stop()
    known = ("should not be run as root", "ACL pattern 'fedmt/v1/tasks/+/global/#' does not contain")
    output = (tmp_path / "mosquitto.log").read_text()
    assert "disconnected due to oversize packet" in output, output
    problems = [
        line
        for line in output.splitlines()
        if re.search(r"error|warning|deprecated", line, re.I) and not any(k in line for k in known)
    ]
    assert not problems, problems


def _largest_chunk_size() -> int:
    """The `le` bound of TransferConfig.chunk_size, found by validation (the largest accepted value)."""
    low, high = DEFAULT_CHUNK_SIZE, 1 << 34
    while low < high:
        mid = (low + high + 1) // 2
        try:
            msgspec.convert({"chunk_size": mid}, TransferConfig)
            low = mid
        except msgspec.ValidationError:
            high = mid - 1
    return low


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def load_compose_service(path: Path = BROKER_DIR / "docker-compose.yml", service: str = "mosquitto") -> dict:
    """{'image': str, 'volumes': [str], 'ports': [str]} of one service (PyYAML when importable, else a small
    indentation-based reader sufficient for this file)."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        spec = yaml.safe_load(path.read_text())["services"][service]
        return {k: spec.get(k, [] if k != "image" else None) for k in ("image", "volumes", "ports")}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    start = next(i for i, ln in enumerate(lines) if ln.strip() == f"{service}:" and _indent(ln) > 0)
    body = []
    for ln in lines[start + 1 :]:
        if _indent(ln) <= _indent(lines[start]):
            break
        body.append(ln)
    key_indent = _indent(body[0])
    result: dict = {"image": None, "volumes": [], "ports": []}
    current = None
    for ln in body:
        if _indent(ln) == key_indent:
            key, _, value = ln.strip().partition(":")
            current = key
            if key == "image":
                result["image"] = value.strip().strip("\"'")
        elif current in ("volumes", "ports") and ln.strip().startswith("- "):
            result[current].append(ln.strip()[2:].strip().strip("\"'"))
    return result


def _mounts(volumes: list[str]) -> dict[str, str]:
    """{container path: source} of short-syntax volume entries (mode suffix dropped)."""
    mounts = {}
    for volume in volumes:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_uses_mosquitto_2_and_mounts_config_acl_passwd_and_certs():
    from testbed.broker import DOCKER_IMAGE

    service = load_compose_service()
    assert service["image"] == "eclipse-mosquitto:2" == DOCKER_IMAGE
    mounts = _mounts(service["volumes"])
    for name in ("mosquitto.conf", "acl", "passwd", "certs"):
        assert mounts.get(f"{CONTAINER_CONFIG_DIR}/{name}") == f"./{name}", mounts
    for name in ("mosquitto.conf", "acl"):  # passwd and certs/ are made by the operator (README)
        assert (BROKER_DIR / name).is_file()


def test_compose_mounts_what_mosquitto_conf_points_at_and_publishes_only_tls():
    conf, service = _conf(), load_compose_service()
    mounts = _mounts(service["volumes"])
    assert conf["acl_file"][-1] in mounts and conf["password_file"][-1] in mounts
    _, listeners = _listeners()
    for options in listeners.values():
        for key in ("cafile", "certfile", "keyfile"):
            if key in options:
                assert str(Path(options[key]).parent) in mounts, options[key]
    data = conf["persistence_location"][-1].rstrip("/")
    assert data in mounts, f"persistence_location {data} is not a volume: retained models vanish on recreate"
    published = {p.split(":")[-1].split("/")[0] for p in service["ports"]}
    tls_ports = {line.split()[1] for line, options in listeners.items() if _is_tls(options)}
    assert published == tls_ports, (published, tls_ports)


def test_compose_health_check_uses_a_user_that_may_read_the_uptime_only():
    test = " ".join(load_compose_healthcheck())
    user = re.search(r"-u (\S+)", test)[1]
    assert "-h 127.0.0.1" in test and "-p 1883" in test  # the container's own localhost listener
    rules = load_acl()
    assert allowed(rules, user, "$SYS/broker/uptime", READ)
    for topic in _device_topics(user) + _update_topics(user) + _device_topics(DEV) + _global_topics():
        assert not allowed(rules, user, topic, READ) and not allowed(rules, user, topic, WRITE), topic
    assert user not in ("monitor", "aggregator")  # one connection per username: it would kick them off


def load_compose_healthcheck(path: Path = BROKER_DIR / "docker-compose.yml") -> list[str]:
    """The mosquitto service's health check command (PyYAML when importable, else its one-line JSON list)."""
    try:
        import yaml
    except ImportError:
        line = next(ln for ln in path.read_text().splitlines() if ln.strip().startswith("test:"))
        return json.loads(line.split(":", 1)[1])
    return yaml.safe_load(path.read_text())["services"]["mosquitto"]["healthcheck"]["test"]


def test_compose_text_reader_matches_yaml_semantics():
    """The fallback reader (used when PyYAML is absent) on an inline document with quoting and comments."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yml"
        path.write_text(
            'services:\n  other:\n    image: x:1\n  mosquitto:\n    # c\n    image: "eclipse-mosquitto:2"\n'
            "    volumes:\n      - ./a:/b:ro\n      - 'v:/d'\n    ports:\n      - \"1883:1883\"\nvolumes:\n  v:\n"
        )
        service = load_compose_service(path)
    assert service["image"] == "eclipse-mosquitto:2"
    assert _mounts(service["volumes"]) == {"/b": "./a", "/d": "v"}
    assert service["ports"] == ["1883:1883"]


# --- 5. the testbed broker ---------------------------------------------------------------------------------


def test_testbed_broker_uses_the_production_acl():
    from testbed.broker import ACL_FILE

    assert Path(ACL_FILE).resolve() == (BROKER_DIR / "acl").resolve()


@pytest.mark.parametrize("tls", [False, True], ids=["password", "tls"])
@pytest.mark.parametrize("docker", [True, False], ids=["docker", "binary"])
def test_testbed_broker_runs_the_shipped_config_with_its_own_paths(tmp_path, docker, tls):
    """Every shipped setting reaches the test broker (paths moved, its log and port its own) and it serves one
    shipped listener: the localhost password listener, or the TLS listener only."""
    from testbed.broker import Mosquitto, shipped_sections

    config_dir = CONTAINER_CONFIG_DIR if docker else str(tmp_path)
    data_dir = "/mosquitto/data" if docker else f"{tmp_path}/data"
    broker = Mosquitto(
        workdir=tmp_path, users={"aggregator": "x"}, port=18830, certs=tmp_path if tls else None
    )
    generated = broker._config(config_dir, data_dir, docker)
    conf = load_mosquitto_conf(generated)
    _check_secure(conf, config_dir)
    shipped_common, shipped_listeners = shipped_sections((BROKER_DIR / "mosquitto.conf").read_text())
    common, [[listener, *served]] = shipped_sections(generated)  # one listener
    moved = [
        line.replace(f"{CONTAINER_CONFIG_DIR}/", f"{config_dir}/").replace("/mosquitto/data/", f"{data_dir}/")
        for line in shipped_common
    ]
    own = ("log_dest ", "user ")
    assert [x for x in common if not x.startswith(own)] == [x for x in moved if not x.startswith(own)]
    assert listener == ("listener 1883" if docker else "listener 18830 127.0.0.1")
    (expected,) = [
        block[1:] for block in shipped_listeners if any(x.startswith("certfile") for x in block) == tls
    ]
    assert served == [x.replace(f"{CONTAINER_CONFIG_DIR}/", f"{config_dir}/") for x in expected]


def test_testbed_broker_start_installs_the_production_acl(tmp_path, monkeypatch):
    """start() (binary mode, process faked) writes the production ACL and a config that points at it."""
    import testbed.broker as tb

    launched = []

    class FakePopen:
        def __init__(self, args, **kwargs):
            launched.append(args)
            self.returncode = None

        def poll(self):
            return None

        def terminate(self):
            self.returncode = 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(tb, "mosquitto_binary", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(tb.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(tb.Mosquitto, "_wait_ready", lambda self, timeout_s: None)
    workdir = tmp_path / "broker"
    with tb.Mosquitto(workdir=workdir, users={"aggregator": "a", "dev1": "b"}, port=18831, use_docker=False):
        pass
    assert launched == [["/usr/sbin/mosquitto", "-c", str(workdir / "mosquitto.conf")]]
    assert (workdir / "acl").read_bytes() == (BROKER_DIR / "acl").read_bytes()
    conf = load_mosquitto_conf((workdir / "mosquitto.conf").read_text())
    _check_secure(conf, str(workdir))
    users = [line.split(":")[0] for line in (workdir / "passwd").read_text().splitlines()]
    assert users == ["aggregator", "dev1"]
