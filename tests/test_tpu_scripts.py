"""tpu_scripts/: help, argument errors, the exact gcloud commands of --dry-run, lint, and a simulated worker.

A fake `gcloud` first on PATH records every call (dry runs must make none). For the runs that are not dry,
it plays one TPU worker: `tpu-vm ssh --command=...` runs the command with bash in a scratch home
directory, `tpu-vm scp` copies into it, and `queued-resources describe` answers states from a file. So
the commands the scripts build for the workers (quoting, nohup, pid files, kill) really run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh"]
ZONE = "us-west4-a"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
verb = " ".join(args[:4])
if verb == "compute tpus tpu-vm ssh":
    command = next(a[len("--command="):] for a in args if a.startswith("--command="))
    os.chdir(os.environ["HOME"])
    os.execvp("bash", ["bash", "-c", command])
elif verb == "compute tpus tpu-vm scp":
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif verb == "compute tpus queued-resources describe":
    states = open(os.environ["FAKE_STATES"]).read().split()
    print(states[0])
    if len(states) > 1:
        open(os.environ["FAKE_STATES"], "w").write(" ".join(states[1:]))
"""

# Stands in for the installed `opsd-jax` on a worker: prints what it got, runs until signalled.
FAKE_TRAIN = """#!/usr/bin/env bash
echo "fake opsd-jax $*"
echo "cache=$JAX_COMPILATION_CACHE_DIR offline=$HF_HUB_OFFLINE extra=${EXTRA_SETTING-}"
if [ -n "${FAKE_IGNORE_TERM-}" ]; then trap '' TERM; else trap 'echo got SIGTERM; exit 0' TERM; fi
sleep 60 &
wait
"""


@pytest.fixture
def sandbox(tmp_path):
    """(environment, calls file, home): fake gcloud on PATH, no OPSD_* settings but launch.sh's validating
    Python (this one), a scratch worker home."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls.jsonl"
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPSD_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        HOME=str(home),
        FAKE_GCLOUD_CALLS=str(calls),
        FAKE_STATES=str(tmp_path / "states"),
        TMPDIR=str(tmp_path),
        OPSD_JAX_PYTHON=sys.executable,
    )
    return env, calls, home


def run(script: str, *args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS_DIR / script), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def recorded(calls: Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def dry_run(script: str, *args: str, sandbox) -> list[str]:
    """The printed commands (comment lines dropped); asserts success and that gcloud was never called."""
    env, calls, _ = sandbox
    result = run(script, *args, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert recorded(calls) == [], "--dry-run must not call gcloud"
    return [line for line in result.stdout.splitlines() if line and not line.startswith("#")]


# ------------------------------------------------------------------------------------------------------
# Help, errors, lint
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, sandbox):
    env, calls, _ = sandbox
    result = run(script, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script} --name NAME --zone ZONE")
    assert "--dry-run" in result.stdout and "--project" in result.stdout
    assert recorded(calls) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_flags_are_named(script, sandbox):
    env, _, _ = sandbox
    extra = ["--config", "configs/demo_tiny.yaml", "--no-validate"] if script == "launch.sh" else []
    result = run(script, "--zone", ZONE, *extra, "--dry-run", env=env)
    assert result.returncode == 2
    assert f"{script}: error: --name is required" in result.stderr
    result = run(script, "--name", "opsd-test", *extra, "--dry-run", env=env)
    assert result.returncode == 2
    assert "--zone is required" in result.stderr
    result = run(script, "--name", "opsd-test", "--zone", ZONE, "--bogus", "--dry-run", env=env)
    assert result.returncode == 2
    assert "unknown argument '--bogus'" in result.stderr


def test_specific_argument_errors(sandbox):
    env, _, _ = sandbox
    cases = [
        ("launch.sh", [], "--config is required"),
        ("launch.sh", ["--config", "configs/nope.yaml"], "--config: no such file 'configs/nope.yaml'"),
        ("launch.sh", ["--config", "configs/demo_tiny.yaml", "notanoverride"], "unexpected argument 'notanoverride'"),
        ("create.sh", ["--accelerator-type", "v3-8"], "--accelerator-type: expected v4-N"),
        ("create.sh", ["--timeout", "soon"], "--timeout: expected a non-negative integer"),
        ("create.sh", ["--runtime-version"], "--runtime-version needs a value"),
        ("setup.sh", ["--source", "git"], "--repo-url is required"),
        ("setup.sh", ["--stage", "/local=/data/x"], "--stage: expected gs://"),
        ("logs.sh", ["--worker", "first"], "--worker: expected a worker index or all"),
        ("stop.sh", ["--grace", "-1"], "--grace: expected a non-negative integer, got '-1'"),
    ]
    for script, args, message in cases:
        result = run(script, "--name", "opsd-test", "--zone", ZONE, *args, "--dry-run", env=env)
        assert result.returncode == 2, (script, args, result.stdout)
        assert message in result.stderr, (script, args, result.stderr)


def test_environment_supplies_name_and_zone(sandbox):
    env, _, _ = sandbox
    env = dict(env, OPSD_TPU_NAME="from-env", OPSD_TPU_ZONE="europe-west4-b", OPSD_GCP_PROJECT="proj")
    result = run("logs.sh", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "gcloud compute tpus tpu-vm ssh from-env --worker=0 --zone=europe-west4-b --project=proj "
    )


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_lint(script):
    path = SCRIPTS_DIR / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if script != "common.sh":  # sourced: it inherits the caller's options
        assert "\nset -euo pipefail\n" in text
        assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert "`" not in re.sub(r"(?m)^\s*#.*$", "", text), "use $(...), not backticks"
    assert "\t" not in text
    assert not re.search(r"(?<![\"'])\$@", text), "unquoted $@"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=SCRIPTS_DIR)
        assert result.returncode == 0, result.stdout


def test_device_counts_per_accelerator_type():
    expected = {"v5litepod-16": 16, "v5litepod-8": 8, "v5p-64": 32, "v5p-8": 4, "v4-32": 16, "v4-8": 4, "v6e-8": 8}
    program = "; ".join(f"devices_for_type {t}; echo" for t in expected)
    result = subprocess.run(
        ["bash", "-c", f"source {SCRIPTS_DIR / 'common.sh'}; {program}"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert [int(n) for n in result.stdout.split()] == list(expected.values())


# ------------------------------------------------------------------------------------------------------
# --dry-run: the exact commands
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accelerator, runtime, devices",
    [
        ("v5litepod-16", "v2-alpha-tpuv5-lite", 16),
        ("v5p-64", "v2-alpha-tpuv5", 32),
        ("v4-32", "tpu-ubuntu2204-base", 16),
    ],
)
def test_create_dry_run(accelerator, runtime, devices, sandbox):
    env, _, _ = sandbox
    result = run(
        "create.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--accelerator-type",
        accelerator,
        "--project",
        "my-project",
        "--spot",
        "--dry-run",
        "--",
        "--labels=team=emotion",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"# {accelerator}: {devices} JAX devices" in result.stdout
    create, describe = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert create == (
        f"gcloud compute tpus queued-resources create opsd-test --node-id=opsd-test "
        f"--accelerator-type={accelerator} --runtime-version={runtime} --zone={ZONE} "
        f"--project=my-project --spot --labels=team=emotion"
    )
    assert describe == (
        f"gcloud compute tpus queued-resources describe opsd-test --zone={ZONE} "
        f"--project=my-project '--format=value(state.state)'"
    )


def test_create_dry_run_variants(sandbox):
    lines = dry_run(
        "create.sh",
        "--name=opsd-test",
        f"--zone={ZONE}",
        "--runtime-version=my-image",
        "--reserved",
        "--no-wait",
        sandbox=sandbox,
    )
    assert lines == [
        f"gcloud compute tpus queued-resources create opsd-test --node-id=opsd-test "
        f"--accelerator-type=v5litepod-16 --runtime-version=my-image --zone={ZONE} --reserved"
    ]
    lines = dry_run("create.sh", "--name", "opsd-test", "--zone", ZONE, "--wait-only", sandbox=sandbox)
    assert len(lines) == 1 and lines[0].startswith("gcloud compute tpus queued-resources describe opsd-test")


def test_setup_dry_run_tarball(sandbox):
    env, _, _ = sandbox
    lines = dry_run(
        "setup.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--accelerator-type",
        "v5p-64",
        "--stage",
        "gs://b/ckpt/Qwen2.5-Omni-7B=/data/checkpoints/Qwen2.5-Omni-7B",
        sandbox=sandbox,
    )
    tar, scp, install, stage, check = lines
    tarball = f"{env['TMPDIR']}/opsd-jax-src-opsd-test.tar.gz"
    assert tar.startswith(f"tar -czf {tarball} --exclude=.git --exclude=.venv ")
    assert tar.endswith(f"-C {REPO} .")
    assert scp == f"gcloud compute tpus tpu-vm scp {tarball} opsd-test:opsd-jax-src.tar.gz --worker=all --zone={ZONE}"
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh opsd-test --worker=all --zone={ZONE} '--command=")
    assert 'tar -xzf "$HOME"/opsd-jax-src.tar.gz -C "$HOME"/opsd-jax' in install
    assert 'python3 -m venv "$HOME"/opsd-jax/.venv' in install
    assert ".venv/bin/pip install -q -e '\\''.[tpu]'\\''" in install
    assert "gcloud storage rsync --recursive gs://b/ckpt/Qwen2.5-Omni-7B /data/checkpoints/Qwen2.5-Omni-7B" in stage
    assert check.startswith(f"gcloud compute tpus tpu-vm ssh opsd-test --worker=all --zone={ZONE} '--command=")
    assert "jax.distributed.initialize(); n = jax.device_count(); expected = 32;" in check


def test_setup_dry_run_git(sandbox):
    lines = dry_run(
        "setup.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--source",
        "git",
        "--repo-url",
        "https://github.com/example/opsd-jax.git",
        "--ref",
        "v0.1",
        "--worker",
        "0",
        "--extra",
        "",
        "--skip-check",
        sandbox=sandbox,
    )
    (install,) = lines
    assert " --worker=0 " in install
    assert 'git clone -q https://github.com/example/opsd-jax.git "$HOME"/opsd-jax' in install
    assert "fetch -q origin v0.1" in install and "checkout -q --force FETCH_HEAD" in install
    assert "pip install -q -e .;" in install


def test_launch_dry_run_validates_and_builds_the_worker_command(sandbox):
    env, _, _ = sandbox
    result = run(
        "launch.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--config",
        "configs/qwen2_5_omni_3b_v5e16.yaml",
        "--accelerator-type",
        "v5litepod-16",
        "--run-name",
        "exp1",
        "--resume",
        "--env",
        "EXTRA=a b",
        "--compile-cache",
        "gs://bucket/jax-cache",
        "--dry-run",
        "train.lr=1e-6",
        "--",
        "prompt.instruction=Name the emotion.",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "# validated configs/qwen2_5_omni_3b_v5e16.yaml for 16 devices (v5litepod-16)" in result.stdout
    scp, ssh = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert scp == (
        f"gcloud compute tpus tpu-vm scp configs/qwen2_5_omni_3b_v5e16.yaml "
        f"opsd-test:.opsd-jax-launch-exp1.yaml --worker=all --zone={ZONE}"
    )
    assert ssh.startswith(f"gcloud compute tpus tpu-vm ssh opsd-test --worker=all --zone={ZONE} '--command=set -e; ")
    for fragment in (
        "export JAX_COMPILATION_CACHE_DIR=gs://bucket/jax-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "
        "EXTRA='\\''a b'\\''",
        'setsid nohup .venv/bin/opsd-jax train --config "$HOME"/opsd-runs/exp1/config.yaml --resume '
        "train.lr=1e-6 '\\''prompt.instruction=Name the emotion.'\\'' >> \"$HOME\"/opsd-runs/exp1/train.log 2>&1 "
        '< /dev/null & echo $! > "$HOME"/opsd-runs/exp1/train.pid',
    ):
        assert fragment in ssh


def test_launch_refuses_a_config_that_does_not_validate(sandbox):
    env, calls, _ = sandbox
    result = run(
        "launch.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--config",
        "configs/qwen2_5_omni_7b_v5p64.yaml",
        "--accelerator-type",
        "v5litepod-1",
        "--dry-run",
        env=env,
    )  # mesh.data 4 needs a multiple of 4 chips
    assert result.returncode == 2
    assert "mesh" in result.stderr and "nothing was started" in result.stderr
    result = run(
        "launch.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--config",
        "configs/qwen2_5_omni_7b_v5p64.yaml",
        "train.lr=-1",
        env=env,
    )  # not a dry run: it must fail before any gcloud call
    assert result.returncode == 2
    assert "train.lr" in result.stderr
    assert recorded(calls) == []


def test_logs_and_stop_dry_run(sandbox):
    (logs,) = dry_run(
        "logs.sh", "--name", "opsd-test", "--zone", ZONE, "--run-name", "exp1", "--lines", "50", "-f", sandbox=sandbox
    )
    assert logs.startswith(f"gcloud compute tpus tpu-vm ssh opsd-test --worker=0 --zone={ZONE} '--command=")
    assert 'log="$HOME"/opsd-runs/exp1/train.log' in logs and 'tail -n 50 -F "$log"' in logs
    (logs,) = dry_run("logs.sh", "--name", "opsd-test", "--zone", ZONE, "--worker", "all", sandbox=sandbox)
    assert " --worker=all " in logs and 'ls -t "$HOME"/opsd-runs/*/train.log' in logs and "sed -u" in logs

    (stop,) = dry_run(
        "stop.sh", "--name", "opsd-test", "--zone", ZONE, "--run-name", "exp1", "--grace", "5", sandbox=sandbox
    )
    assert stop.startswith(f"gcloud compute tpus tpu-vm ssh opsd-test --worker=all --zone={ZONE} '--command=")
    assert 'for f in "$HOME"/opsd-runs/exp1/train.pid;' in stop
    assert "kill -TERM -- -$p" in stop and "[ $i -lt 5 ]" in stop and "kill -KILL -- -$p" in stop
    stop, delete = dry_run("stop.sh", "--name", "opsd-test", "--zone", ZONE, "--delete", "--yes", sandbox=sandbox)
    assert '"$HOME"/opsd-runs/*/train.pid' in stop
    assert delete == f"gcloud compute tpus queued-resources delete opsd-test --zone={ZONE} --force --quiet"
    (delete,) = dry_run("stop.sh", "--name", "opsd-test", "--zone", ZONE, "--delete-only", sandbox=sandbox)
    assert delete == f"gcloud compute tpus queued-resources delete opsd-test --zone={ZONE} --force"


# ------------------------------------------------------------------------------------------------------
# Not dry: the fake gcloud plays the queued resource and one worker
# ------------------------------------------------------------------------------------------------------


def test_create_waits_until_active(sandbox):
    env, calls, _ = sandbox
    Path(env["FAKE_STATES"]).write_text("ACCEPTED PROVISIONING ACTIVE")
    result = run("create.sh", "--name", "opsd-test", "--zone", ZONE, "--poll", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "queued resource opsd-test is ACTIVE" in result.stderr
    verbs = [" ".join(call[:4]) for call in recorded(calls)]
    assert verbs == ["compute tpus queued-resources create"] + ["compute tpus queued-resources describe"] * 3


def test_create_reports_a_failed_request(sandbox):
    env, _, _ = sandbox
    Path(env["FAKE_STATES"]).write_text("FAILED")
    result = run("create.sh", "--name", "opsd-test", "--zone", ZONE, "--wait-only", "--poll", "0", env=env)
    assert result.returncode == 2
    assert "queued resource opsd-test is FAILED" in result.stderr
    Path(env["FAKE_STATES"]).write_text("WAITING_FOR_RESOURCES")
    result = run(
        "create.sh", "--name", "opsd-test", "--zone", ZONE, "--wait-only", "--poll", "0", "--timeout", "0", env=env
    )
    assert result.returncode == 2
    assert "still WAITING_FOR_RESOURCES after 0s" in result.stderr


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which nobody may reap here, do not count)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_leftover(pids: list[int]) -> None:
    for pid in pids:  # only the process groups this test started
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _install_fake_project(home: Path) -> None:
    train = home / "opsd-jax" / ".venv" / "bin" / "opsd-jax"
    train.parent.mkdir(parents=True)
    train.write_text(FAKE_TRAIN)
    train.chmod(0o755)


def _launched_pid(output: str) -> int:
    match = re.search(r"started (\S+), pid (\d+)", output)
    assert match, output
    return int(match.group(2))


def test_launch_logs_stop_on_a_simulated_worker(sandbox):
    env, _, home = sandbox
    result = run(
        "launch.sh",
        "--name",
        "opsd-test",
        "--zone",
        ZONE,
        "--config",
        "configs/demo_tiny.yaml",
        "--no-validate",
        "--env",
        "EXTRA_SETTING=it's set",
        "train.lr=1e-6",
        "prompt.instruction=Who's sad?",
        env=env,
    )
    assert result.returncode == 1  # no project installed on the worker yet
    assert "no .venv/bin/opsd-jax in opsd-jax: run setup.sh first" in result.stderr

    _install_fake_project(home)
    pids: list[int] = []
    run_dir = home / "opsd-runs" / "demo_tiny"
    try:
        result = run(
            "launch.sh",
            "--name",
            "opsd-test",
            "--zone",
            ZONE,
            "--config",
            "configs/demo_tiny.yaml",
            "--no-validate",
            "--env",
            "EXTRA_SETTING=it's set",
            "train.lr=1e-6",
            "prompt.instruction=Who's sad?",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        pids.append(_launched_pid(result.stdout))
        assert (run_dir / "config.yaml").read_text() == (REPO / "configs" / "demo_tiny.yaml").read_text()
        assert int((run_dir / "train.pid").read_text()) == pids[0]
        assert os.getpgid(pids[0]) == pids[0], "the run must lead its own process group"
        assert _group_alive(pids[0])

        result = run(
            "launch.sh",
            "--name",
            "opsd-test",
            "--zone",
            ZONE,
            "--config",
            "configs/demo_tiny.yaml",
            "--no-validate",
            env=env,
        )
        assert result.returncode == 1
        assert "run demo_tiny is already running" in result.stderr

        expected = (
            f"fake opsd-jax train --config {run_dir}/config.yaml train.lr=1e-6 prompt.instruction=Who's sad?\n"
            f"cache={home}/.cache/opsd-jax/jax offline=1 extra=it's set"
        )
        for _ in range(50):  # the background process writes its first lines asynchronously
            result = run("logs.sh", "--name", "opsd-test", "--zone", ZONE, env=env)
            if expected in result.stdout:
                break
        assert expected in result.stdout, result.stdout + result.stderr
        result = run("logs.sh", "--name", "opsd-test", "--zone", ZONE, "--worker", "all", "--lines", "1", env=env)
        assert result.returncode == 0 and re.fullmatch(r"\[\S+\] cache=.*\n", result.stdout), result.stdout

        result = run("stop.sh", "--name", "opsd-test", "--zone", ZONE, "--grace", "10", env=env)
        assert result.returncode == 0, result.stderr
        assert f"SIGTERM to {pids[0]}" in result.stdout and "SIGKILL" not in result.stdout
        assert not (run_dir / "train.pid").exists()
        assert not _group_alive(pids[0])
        assert "got SIGTERM" in (run_dir / "train.log").read_text()

        # A run that ignores SIGTERM is killed after the grace period; then nothing is left to stop.
        result = run(
            "launch.sh",
            "--name",
            "opsd-test",
            "--zone",
            ZONE,
            "--config",
            "configs/demo_tiny.yaml",
            "--no-validate",
            "--resume",
            env=dict(env, FAKE_IGNORE_TERM="1"),
        )
        assert result.returncode == 0, result.stderr
        pids.append(_launched_pid(result.stdout))
        result = run(
            "stop.sh", "--name", "opsd-test", "--zone", ZONE, "--run-name", "demo_tiny", "--grace", "1", env=env
        )
        assert result.returncode == 0, result.stderr
        assert f"SIGKILL to {pids[1]} after 1s" in result.stdout
        assert not _group_alive(pids[1])
        result = run("stop.sh", "--name", "opsd-test", "--zone", ZONE, env=env)
        assert result.returncode == 0 and "no running run" in result.stdout
    finally:
        _kill_leftover(pids)
