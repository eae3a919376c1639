"""`dharma export`: torch.export (.pt2) and ONNX graphs whose logits match the PyTorch model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakedists import install, run_dharma
from tiny import tiny_model

from dharma_kernel import checkpoint
from dharma_kernel.errors import DharmaError
from dharma_kernel.export import dense_routing, export_model
from dharma_kernel.protocol import ModuleOutput
from dharma_kernel.testing import run_cli as dharma

# Logits at real tokens, exported vs PyTorch, both float32 on CPU. Measured here: at most
# 6e-8 for the .pt2 and 1.2e-7 for ONNX under onnxruntime; the bound leaves room for other CPUs.
TOLERANCE = 1e-5


def inputs(batch: int, length: int, pad: int, side: str = "left", seed: int = 0):
    """Token ids and a mask with ``pad`` padding positions in the last row."""
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[-1, :pad] = 0 if side == "left" else 1
        if side == "right":
            mask[-1, length - pad :] = 0
    return ids, mask


# batch 1 unpadded, left padding, right padding, a longer batch: sizes unlike the traced example's
CASES = [(1, 5, 0, "left"), (3, 13, 4, "left"), (2, 21, 6, "right"), (4, 40, 9, "left")]


def reference(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


def max_difference(exported: np.ndarray | torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference at real tokens: a padding position's logits mean nothing, and runtimes
    disagree about attention rows whose every key is masked (the bare backbone does too)."""
    real = mask.bool()
    return (torch.as_tensor(exported)[real] - expected[real]).abs().max().item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_routing_gives_what_routed_gives(top_k):
    # export traces routed stacks densely; this is what makes that a faithful copy
    model = tiny_model("routed", top_k=top_k)
    ids, mask = inputs(3, 11, 4)
    with torch.no_grad():
        routed = model(ids, attention_mask=mask, use_cache=False)
        with dense_routing(model):
            dense = model(ids, attention_mask=mask, use_cache=False)
    assert all(not stack.dense_routing for stack in model.stacks.values())  # restored
    torch.testing.assert_close(dense.logits, routed.logits, rtol=0, atol=1e-6)
    for ref, score in routed.module_scores.items():
        torch.testing.assert_close(dense.module_scores[ref], score, rtol=0, atol=1e-6)


CLASSIFIER = [{"plugin": "classification", "config": {"labels": ["a", "b"]}}]


@pytest.mark.parametrize("composition,top_k,heads", [("routed", 2, []), ("sequential", 1, CLASSIFIER)])
def test_torch_export_matches_pytorch(tmp_path, composition, top_k, heads):
    model = tiny_model(composition, top_k=top_k, heads=heads)
    path = export_model(model, tmp_path / "model.pt2", "torch-export")
    assert list(model.heads) == [h["plugin"] for h in heads]  # heads are left out of the graph, and kept
    loaded = torch.export.load(str(path)).module()
    worst = 0.0
    for batch, length, pad, side in CASES:
        ids, mask = inputs(batch, length, pad, side)
        with torch.no_grad():
            logits = loaded(ids, mask)
        assert logits.shape == (batch, length, 97)
        worst = max(worst, max_difference(logits, reference(model, ids, mask), mask))
    print(f"torch-export {composition} top_k={top_k}: max abs difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_onnx_matches_pytorch_under_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_model("routed", top_k=2)
    path = export_model(model, tmp_path / "model.onnx", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    worst = 0.0
    for batch, length, pad, side in CASES:
        ids, mask = inputs(batch, length, pad, side)
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert logits.shape == (batch, length, 97)
        worst = max(worst, max_difference(logits, reference(model, ids, mask), mask))
    print(f"onnx routed top_k=2: max abs difference {worst:.2e}")
    assert worst <= TOLERANCE


def _with_forward(model, ref: str, layer: int, forward) -> None:
    module = model.module_at(ref, layer)
    original = module.forward
    module.forward = lambda hidden, ctx: forward(original(hidden, ctx), hidden)


def test_an_untraceable_module_is_named(tmp_path):
    model = tiny_model("routed", top_k=1)

    def through_numpy(out, hidden):
        if hidden.detach().numpy().max() > 100:  # a host round trip: no graph can hold it
            return ModuleOutput(out.hidden * 0, out.score)
        return out

    _with_forward(model, "darshanas.vedanta", 1, through_numpy)
    with pytest.raises(DharmaError, match=r"^module darshanas.vedanta cannot be exported: ") as caught:
        export_model(model, tmp_path / "model.onnx", "onnx")
    assert "remove the module from the manifest" in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


def test_an_operator_onnx_lacks_is_named_with_its_module(tmp_path):
    model = tiny_model("routed", top_k=1)

    def with_eigenvalues(out, hidden):
        gram = hidden[..., :4].transpose(-1, -2) @ hidden[..., :4]
        return ModuleOutput(out.hidden + 0 * torch.linalg.eigvalsh(gram).sum(), out.score)

    _with_forward(model, "paths.dharma", 0, with_eigenvalues)
    with pytest.raises(
        DharmaError, match=r"ONNX export failed at aten\._linalg_eigh in module paths\.dharma: "
    ):
        export_model(model, tmp_path / "model.onnx", "onnx")


def test_unknown_format_and_a_directory_are_refused(tmp_path):
    with pytest.raises(DharmaError, match="unknown export format 'tflite'") as caught:
        export_model(tiny_model(), tmp_path / "m", "tflite")
    assert "Use one of: onnx, torch-export." in str(caught.value)
    with pytest.raises(DharmaError, match=f"^{tmp_path} is a directory") as caught:
        export_model(tiny_model(), tmp_path, "onnx")
    assert f"Give a file name, such as {tmp_path / 'model.onnx'}." in str(caught.value)


def test_cli_exports_and_checks_a_saved_model(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_model("routed", top_k=2)
    directory = checkpoint.save(model, tmp_path / "model")
    path = tmp_path / "m.onnx"
    code, stdout, stderr = dharma(capsys, "export", directory, "--format", "onnx", "-o", path, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)  # nothing but the JSON on stdout
    assert result["model"] == str(directory) and result["format"] == "onnx"
    assert result["output"] == str(path) and result["bytes"] == path.stat().st_size
    assert list(result["inputs"]) == ["input_ids", "attention_mask"] and list(result["outputs"]) == ["logits"]
    assert 0 <= result["max_abs_difference"] <= TOLERANCE  # the command ran the file and compared
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # and so do we
    ids, mask = inputs(3, 13, 4)
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert max_difference(logits, reference(model, ids, mask), mask) <= TOLERANCE


HOST_ROUND_TRIP = """
import torch
from dharma_kernel.blocks import BottleneckAdapter
from dharma_kernel.protocol import DharmaModule, ModuleOutput


class Probe(DharmaModule):
    family, name, module_api = "paths", "probe", "1.0"
    concepts = ("probe",)

    def __init__(self, hidden_size, config=None):
        super().__init__(hidden_size, config)
        self.adapter = BottleneckAdapter(hidden_size, 4)

    def forward(self, hidden, ctx):
        scale = float(hidden.detach().abs().numpy().max())  # through numpy: untraceable
        return ModuleOutput(hidden + self.adapter(hidden) / (1 + scale), torch.zeros(hidden.shape[:2]))
"""


def test_cli_names_the_plugin_that_cannot_be_exported(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(
        site,
        "dharma-plugin-probe",
        {"dharma.modules": {"paths.probe": "dharma_probe:Probe"}, "dharma.api": {"paths.probe": "1.0"}},
        {"dharma_probe": HOST_ROUND_TRIP},
    )
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        "[backbone]\n"
        'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }\n'
        '[modules]\ninclude = ["paths.dharma", "paths.probe"]\nat_layers = [1]\ncomposition = "sequential"\n'
    )
    assert run_dharma(site, "assemble", str(manifest), "-o", str(tmp_path / "model")).returncode == 0
    result = run_dharma(
        site, "export", str(tmp_path / "model"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: module paths.probe cannot be exported: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.onnx").exists()
