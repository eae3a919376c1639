"""`dharma generate --compile` (dharma_kernel.decoding): the routed stacks compute a slot for every
(module, token) pair, so a compiled decoder traces them whole, and decodes exact routing's tokens.

Compiled here with dynamo's "eager" backend: dynamo's capture (with fake-tensor propagation) is
where graph breaks and recompiles are decided; inductor's code generation is torch's own and
takes a minute or more on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_capacity import make_batch, make_ungroupable
from test_grouped import all_modules

from dharma_kernel import decoding
from dharma_kernel.application import load_application
from dharma_kernel.decoding import compiled_decoding
from dharma_kernel.stack import ModuleStack
from dharma_kernel.testing import run_cli, tiny_serving_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_serving_model(tmp_path_factory.mktemp("decode") / "sage", layers=1)  # one layer: fewer graphs


@pytest.fixture
def traced(monkeypatch):
    """dynamo alone for compiled_decoding, and dynamo's caches and counters fresh."""
    monkeypatch.setattr(decoding, "BACKEND", "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def decode(model, ids, mask, **options):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
    return out.sequences, torch.stack(out.logits)


def every_token_slots(model, on: bool) -> None:
    for stack in model.stacks.values():
        stack.every_token_slots = on


@pytest.mark.parametrize("last_token_real", [False, True], ids=["right padding", "left padding"])
def test_every_token_slots_decode_exact_routings_tokens(last_token_real, monkeypatch):
    """All 37 modules routed at two layers, greedy, sampled and beam search: the same tokens,
    logits within 1e-5; and no routed stack reads its module choices back (no `_run_modules`)."""
    model = all_modules("routed").eval()
    ids, mask = make_batch(last_token_real)
    outputs = {}
    for on in (False, True):
        every_token_slots(model, on)
        if on:
            monkeypatch.setattr(ModuleStack, "_run_modules", None)  # called: a TypeError
        torch.manual_seed(5)
        outputs[on] = [decode(model, ids, mask, do_sample=sample) for sample in (False, True)]
        with torch.no_grad():
            beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, pad_token_id=0)
        outputs[on].append((beams, torch.zeros(1)))
    for fixed, exact in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(fixed[0], exact[0])
        torch.testing.assert_close(fixed[1], exact[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(outputs[True][0][0], outputs[True][1][0])  # sampling drew other tokens


def test_every_token_slots_leave_training_as_it_was():
    """The flag is for decoding: a training forward with it routes exactly (or by capacity, if set)."""
    model = all_modules("routed").train()
    ids, mask = make_batch(True)
    losses = []
    for on in (False, True):
        every_token_slots(model, on)
        torch.manual_seed(0)
        losses.append(model(input_ids=ids, attention_mask=mask, labels=ids).loss.detach())
    assert torch.equal(losses[0], losses[1])


def test_compiled_decoding_has_no_graph_break_and_compiles_once(model_dir, traced):
    model, tokenizer = load_application(model_dir)
    model.eval()
    ids = tokenizer(["dharma is duty and", "moksha"], return_tensors="pt", padding=True)
    expected = decode(model, ids["input_ids"], ids["attention_mask"], do_sample=False)
    graphs = []
    with compiled_decoding(model):
        for _ in range(2):  # the second call compiles nothing new
            got = decode(model, ids["input_ids"], ids["attention_mask"], do_sample=False)
            assert torch.equal(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
            graphs.append(traced["stats"]["unique_graphs"])
    assert sum(traced["graph_break"].values()) == 0, dict(traced["graph_break"])
    assert graphs[1] == graphs[0]
    assert 0 < graphs[0] <= 4  # the prompt, the first steps, then one dynamic step for every cache length
    # afterwards the model is eager again: a new shape compiles nothing, and stacks route exactly
    with torch.no_grad():
        model(input_ids=ids["input_ids"][:, :3])
    assert traced["stats"]["unique_graphs"] == graphs[1]
    assert not any(stack.every_token_slots for stack in model.stacks.values())


def test_a_module_that_cannot_group_is_named_in_a_warning(monkeypatch):
    model = all_modules("routed").eval()
    make_ungroupable(model, ["paths.karma"])
    monkeypatch.setattr(decoding, "BACKEND", "eager")
    with pytest.warns(UserWarning, match=r"paths\.karma cannot run grouped .* the graph breaks there"):
        with compiled_decoding(model):
            pass


def test_generate_compile_writes_the_eager_text_and_table(model_dir, traced, monkeypatch, capsys):
    """Sampled, with --explain, whose forward after the generation runs eagerly."""
    args = ["generate", str(model_dir), "dharma is", "--max-new-tokens", "8", "--seed", "3", "--explain"]
    code, eager, _ = run_cli(capsys, *args)
    assert code == 0
    code, compiled, err = run_cli(capsys, *args, "--compile")
    assert code == 0, err
    assert compiled == eager
    assert len(eager.split()) > 2
    assert traced["stats"]["unique_graphs"] > 0  # it did compile


def test_generate_compile_says_what_to_do_when_the_compiler_fails(model_dir, traced, monkeypatch, capsys):
    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(decoding, "BACKEND", broken)
    code, out, err = run_cli(capsys, "generate", str(model_dir), "dharma is", "--compile")
    assert code == 2
    assert "torch.compile could not compile the model: RuntimeError: no C++ compiler found" in err
    assert "Run without --compile" in err
    assert "Traceback" not in err + out
