"""`dharma validate` and `dharma assemble` as a user runs them: exit codes, messages, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakedists import install, run_dharma

ROOT = Path(__file__).resolve().parents[1]
TINY = 'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }'


def write(tmp_path: Path, body: str, backbone: str = TINY) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(f'[model]\nname = "t"\n[backbone]\n{backbone}\n{body}')
    return path


MODULES = (
    '[modules]\npreset = "tiny"\ninclude = ["dharma", "vedanta"]\n'
    'at_layers = [0, 1]\ncomposition = "routed"\n'
)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_validate_prints_the_parameter_table(tmp_path):
    result = run_dharma(None, "validate", str(write(tmp_path, MODULES)))
    assert result.returncode == 0, result.stderr
    assert "modules: 2 at layers [0, 1], routed top_k 2, preset tiny" in result.stdout
    assert "ok (no weights allocated)" in result.stdout
    rows = json.loads(run_dharma(None, "validate", str(write(tmp_path, MODULES)), "--json").stdout)
    assert [r["group"] for r in rows] == ["backbone", "darshanas", "paths", "routers", "total"]
    assert rows[-1]["parameters"] == sum(r["parameters"] for r in rows[:-1])


def test_validate_allocates_no_weights(tmp_path):
    # 48 layers x 8192 wide: about 39 billion parameters, 156 GB in fp32. Only meta tensors fit here.
    huge = 'config = { architecture = "gpt2", n_layer = 48, n_embd = 8192, n_head = 64 }'
    result = run_dharma(None, "validate", str(write(tmp_path, MODULES, huge)), "--json")
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)[-1]["parameters"]
    assert total > 38_000_000_000


def test_assemble_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "model"
    result = run_dharma(
        None, "assemble", str(write(tmp_path, MODULES)), "-o", str(out), "--freeze", "spiritual"
    )
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["manifest"]["freeze"] == {"groups": ["spiritual"]}
    code = (
        "import dharma_kernel, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, m.module_refs)"
    )
    loaded = run_dharma(None, code=code)
    assert loaded.stdout.strip() == "DharmaModel ['paths.dharma', 'darshanas.vedanta']", loaded.stderr


def test_a_failed_assemble_leaves_the_saved_model_alone(tmp_path):
    out = tmp_path / "model"
    assert run_dharma(None, "assemble", str(write(tmp_path, MODULES)), "-o", str(out)).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    result = run_dharma(
        None, "assemble", str(write(tmp_path, MODULES)), "-o", str(out), "--freeze", "spirtual"
    )
    assert_user_error(result, "'spirtual' is not a group of this model; did you mean 'spiritual'")
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("[modules\n", ["m.toml:5", "invalid TOML"]),
        (
            '[modules]\ncompositon = "routed"\n',
            ["modules.compositon: unknown key; did you mean 'composition'?"],
        ),
        ('[train]\nbatch_size = "eight"\n', ["train.batch_size: expected an integer, got 'eight'"]),
        (
            '[modules]\ninclude = ["yoga"]\nat_layers = [0]\n',
            ["'yoga' is ambiguous: paths.yoga or darshanas.yoga"],
        ),
        ('[modules]\ninclude = ["vedanta"]\nat_layers = [7]\n', ["layer 7 is out of range"]),
        (MODULES + "top_k = 5\n", ["modules.top_k: 5 is larger than the stack of 2"]),
        (MODULES + '[freeze]\ngroups = ["backbone", "spiritual"]\n', ["leaves no trainable parameters"]),
    ],
)
def test_bad_manifests_exit_2_with_one_clear_message(tmp_path, body, fragments):
    assert_user_error(run_dharma(None, "validate", str(write(tmp_path, body))), *fragments)


def test_requires_not_satisfied(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('requires = ["dharma-plugin-vedanta>=9"]\n[backbone]\n' + TINY + "\n")
    assert_user_error(
        run_dharma(None, "validate", str(path)),
        "dharma-plugin-vedanta 0.1.0 is installed",
        "pip install 'dharma-plugin-vedanta>=9'",
    )


def test_missing_manifest_file(tmp_path):
    assert_user_error(run_dharma(None, "validate", str(tmp_path / "nope.toml")), "nope.toml")


BROKEN = "raise ImportError('needs libfoo')\n"


def test_a_broken_plugin_does_not_break_unrelated_manifests(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(
        site,
        "dharma-plugin-karma",
        {"dharma.modules": {"paths.karma": "dharma_fake_karma:Karma"}, "dharma.api": {"paths.karma": "1.0"}},
        {"dharma_fake_karma": BROKEN},
    )
    result = run_dharma(site, "validate", str(write(tmp_path, MODULES)))
    assert result.returncode == 0, result.stderr
    needing = write(tmp_path, '[modules]\ninclude = ["karma"]\nat_layers = [0]\n')
    assert_user_error(
        run_dharma(site, "validate", str(needing)), "paths.karma", "needs libfoo", "dharma-plugin-karma"
    )


def test_an_uninstalled_standard_module_names_its_distribution(tmp_path):
    # A metadata-only dharma-plugin-karma earlier on the path shadows the installed one: to
    # importlib.metadata, karma is now installed without its entry point, as after an uninstall.
    site = tmp_path / "site"
    site.mkdir()
    install(site, "dharma-plugin-karma", {})
    needing = write(tmp_path, '[modules]\ninclude = ["karma"]\nat_layers = [0]\n')
    assert_user_error(
        run_dharma(site, "validate", str(needing)), "paths.karma: pip install dharma-plugin-karma"
    )


def test_the_example_manifest_validates():
    result = run_dharma(None, "validate", str(ROOT / "examples" / "foundation.toml"))
    assert result.returncode == 0, result.stderr


def test_pretrained_backbone_brings_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dharma_kernel.assemble import build_model

    backbone_dir = tmp_path / "tiny-gpt2"
    words = ["<eos>", "dharma", "karma", "धर्म", *(f"w{i}" for i in range(93))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(backbone_dir)
    tiny = {"architecture": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 97}
    build_model(tiny, {}).backbone.save_pretrained(backbone_dir)
    path = write(tmp_path, MODULES, backbone='pretrained = "tiny-gpt2"')
    out = tmp_path / "model"
    result = run_dharma(None, "assemble", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "with its tokenizer" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("dharma धर्म karma")["input_ids"] == [1, 3, 2]


def test_validate_shows_the_capacity_and_refuses_it_off_a_routed_stack(tmp_path):
    result = run_dharma(None, "validate", str(write(tmp_path, MODULES + "capacity_factor = 1.25\n")))
    assert result.returncode == 0, result.stderr
    assert "routed top_k 2, capacity 1.25, preset tiny" in result.stdout
    parallel = MODULES.replace('"routed"', '"parallel"') + "capacity_factor = 1.25\n"
    result = run_dharma(None, "validate", str(write(tmp_path, parallel)))
    assert_user_error(result, "capacity_factor applies to routed stacks", 'composition = "routed"')
    result = run_dharma(None, "validate", str(write(tmp_path, MODULES + "capacity_factor = 0\n")))
    assert_user_error(result, "capacity_factor")
