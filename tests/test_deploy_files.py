"""The deployment files: ``docker-compose.yml`` parsed with PyYAML and checked
against what the code reads, and the ``Dockerfile``'s entry point checked
against the CLI (no compose client or Docker daemon runs in CI)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from parrot.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SOURCES = "\n".join(p.read_text() for p in (ROOT / "parrot").rglob("*.py"))
PARROT_SERVICES = ("api", "ray-head", "ray-gpu-worker")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _interpolated_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?msg}`` with defaults filled in."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "set", text)


def test_services_and_their_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"api", "redis", "ray-head", "ray-gpu-worker"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL"), name
    # The API is ready only when its engines are (see /readyz), and starts after its dependencies are healthy.
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for dep in ("redis", "ray-head", "ray-gpu-worker"):
        assert services["api"]["depends_on"][dep]["condition"] == "service_healthy"
    assert services["ray-gpu-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) >= {"redis-data", "parrot-cache"}


def test_gpu_workers_reserve_nvidia_devices(compose):
    devices = compose["services"]["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Only workers hold GPUs: the head and the API offer Ray nothing to place engines on.
    assert "deploy" not in compose["services"]["ray-head"] and "deploy" not in compose["services"]["api"]
    assert "--num-gpus=0" in compose["services"]["ray-head"]["command"]


def test_parrot_containers_share_one_image_and_the_model_folders(compose):
    services = compose["services"]
    images = {services[s]["image"] for s in PARROT_SERVICES}
    assert len(images) == 1  # one Ray version across the cluster
    assert all(services[s]["build"]["context"] == "." for s in PARROT_SERVICES)
    for name in ("api", "ray-gpu-worker"):
        mounts = services[name]["volumes"]
        assert "./models:/models:ro" in mounts and "parrot-cache:/cache" in mounts
        # Where the embedded model is built must be the same path on every node.
        assert _interpolated_defaults(str(services[name]["environment"].get("PARROT_CACHE_DIR", "/cache"))) == "/cache"


def test_every_configured_variable_is_read_by_the_code(compose):
    env = compose["services"]["api"]["environment"]
    assert {"PARROT_ADMIN_KEY", "PARROT_REDIS_URL", "PARROT_RAY_ADDRESS", "PARROT_ENGINES", "PARROT_ENGINE_GPUS",
            "PARROT_MODEL", "PARROT_REMOTE_ENGINES"} <= set(env)
    for service in compose["services"].values():
        for name in service.get("environment", {}):
            if name.startswith("PARROT_"):
                assert f'"{name}"' in SOURCES, f"{name} is set in docker-compose.yml but no code reads it"
    assert env["PARROT_RAY_ADDRESS"] == "auto" and env["PARROT_REDIS_URL"].startswith("redis://redis:")
    # The admin key must be given: compose refuses to start without it.
    assert ":?" in env["PARROT_ADMIN_KEY"]


def test_the_api_command_parses_with_the_cli(compose):
    api = compose["services"]["api"]
    script = _interpolated_defaults(api["command"][0])
    ray_start, serve = script.split("&&")
    assert shlex.split(ray_start)[:2] == ["ray", "start"]
    argv = shlex.split(serve)
    assert argv[:3] == ["exec", "parrot", "serve"]
    args = build_parser().parse_args(argv[2:])
    assert args.command == "serve"


def test_dockerfile_entrypoint_is_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, re.M)
    assert entry and cmd
    entry_argv, cmd_argv = yaml.safe_load(entry.group(1)), yaml.safe_load(cmd.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry_argv == ["parrot"] and scripts["parrot"] == "parrot.cli:main"
    assert build_parser().parse_args(cmd_argv).command == "serve"
    # The image installs what the compose services run: the server, Ray, and binds every interface.
    install = re.search(r'pip install "\.\[([a-z,]+)\]"', text)
    assert install and {"server", "ray"} <= set(install.group(1).split(","))
    assert "PARROT_HOST=0.0.0.0" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"server", "client", "ray"} <= set(extras)
