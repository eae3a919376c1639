"""A tiny training setup for tests: a short corpus, a 2-layer GPT-2 manifest, and run helpers."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

SENTENCES = [
    "Dharma is the duty that holds a life together, and karma is action done in its light.",
    "The Vedanta teacher asks who is aware when the mind is quiet and the senses rest.",
    "A farmer waters the field at dawn; the rain comes later and the harvest after that.",
    "Karma yoga is work offered without grasping at the fruit of action.",
    "The river carries silt to the delta, where the soil grows rice for the villages.",
    "Seva means service given freely, a gift that asks for nothing in return.",
    "In the market the weaver sells cotton cloth dyed with indigo and turmeric.",
    "Brahman, says the Upanishad, is the ground of all that appears and changes.",
    "The student reads slowly, copying each verse twice before the lamp goes out.",
    "Ahimsa is the refusal to harm, in deed, in word and in thought.",
    "Monsoon clouds gather over the hills and the children run home before the storm.",
    "Atman is the self that witnesses, unchanged while the body grows old.",
]


def write_corpus(folder: Path, copies: int = 6) -> Path:
    """About 5 KB of text: each sentence a record, repeated with a numbered twist so none is a duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{s} (note {i})" for i in range(copies) for s in SENTENCES]
    path = folder / "corpus.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def write_manifest(
    folder: Path,
    *,
    modules: bool = True,
    dropout: float = 0.1,
    train: dict | None = None,
    extra: str = "",
) -> Path:
    """A manifest training a 2-layer, 64-wide GPT-2 (with 2 tiny routed modules) on write_corpus()."""
    write_corpus(folder / "data")
    settings = {
        "batch_size": 4,
        "grad_accum": 2,
        "max_steps": 8,
        "eval_every": 4,
        "learning_rate": 3e-3,
        "output": "run",
        **(train or {}),
    }
    train_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    module_lines = (
        '[modules]\npreset = "tiny"\ninclude = ["dharma", "vedanta"]\nat_layers = [0, 1]\n'
        'composition = "routed"\ntop_k = 1\n'
        if modules
        else ""
    )
    text = (
        '[model]\nname = "tiny"\n'
        "[backbone]\n"
        'config = { architecture = "gpt2", n_layer = 2, n_embd = 64, n_head = 2, n_positions = 64, '
        f"vocab_size = 400, resid_pdrop = {dropout}, embd_pdrop = {dropout}, attn_pdrop = {dropout} }}\n"
        f"{module_lines}"
        '[data]\ntrain = ["data"]\nmax_length = 32\neval_fraction = 0.1\n'
        f"[train]\n{train_lines}\n{extra}"
    )
    path = folder / "m.toml"
    path.write_text(text)
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def weights(directory: Path) -> dict:
    return load_file(str(Path(directory) / "model.safetensors"))
