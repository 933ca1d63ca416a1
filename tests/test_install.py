"""The install contract: pinned, CPU-only, reproducible (see docs/install.md)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "deploy" / "lock" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            pkg, _, version = line.partition("==")
            assert version, f"{name}: `{line}` is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", pkg.lower())] = version
    return pins


def test_cpu_lock_pins_cpu_torch_and_fbgemm():
    cpu = _pins("cpu.txt")
    assert cpu == {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0"}
    assert "-r common.txt" in (ROOT / "deploy/lock/cpu.txt").read_text()


def test_common_lock_has_no_cuda_or_torch():
    common = _pins("common.txt")
    assert common["torchrec"] == "1.8.0" and common["ray"] == "2.60.0" and common["mlflow"].startswith("3.17")
    assert not [p for p in common if p.startswith(("nvidia-", "torch==", "fbgemm")) or p in ("torch", "triton")]


def test_makefile_installs_with_no_deps():
    mk = (ROOT / "Makefile").read_text()
    assert "install --no-deps -r deploy/lock/cpu.txt" in mk
    assert "install --no-deps --no-build-isolation -e ." in mk
    assert "\ntest: install\n" in mk and "\ndemo: install\n" in mk


def test_installed_torch_is_the_cpu_build():
    import fbgemm_gpu  # noqa: F401  (the CPU build imports without CUDA)
    import torch
    import torchrec  # noqa: F401

    assert torch.__version__ == "2.13.0+cpu" and torch.version.cuda is None


def test_ci_runs_the_readme_command():
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:15] if line.strip().startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]
