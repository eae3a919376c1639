"""DharmaModel: a Hugging Face causal LM with module stacks running between its blocks."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from . import registry
from .backbone import find_blocks, fresh_backbone, hidden_size, num_layers
from .columns import Columns, table_of
from .errors import DharmaError, error_line
from .losses import concept_losses, lm_loss, routing_loss, total_loss
from .protocol import DharmaModule, HeadModule, ModuleConfig
from .routing import document_starts
from .stack import ModuleStack, StackResult, module_key, real_tokens
from .validation import format_validation_error
from .version import __version__


class DharmaConfig(PreTrainedConfig):
    """``text_config``: the backbone's config. ``layout``: the resolved modules, layers and heads.

    ``manifest``: the manifest this model was assembled from. ``lock``: distribution,
    version and MODULE_API of every plugin used.
    """

    model_type = "dharma"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PreTrainedConfig | None = None
    layout: dict | None = None
    manifest: dict | None = None
    lock: list | None = None
    dharma_version: str = __version__


@dataclass
class DharmaOutput(ModelOutput):
    """loss: the weighted total. losses: every component (``lm``, ``concept``, ``router_balance``,
    ``<ref>/<name>`` from modules, ``<head>/<name>`` from heads, ``routing@<layer>``).
    module_scores: per module ref, its activation ``[B, T]`` at every token, averaged over the
    layers where it sits: under routed composition the router's probability that the module's
    concept has come up in the document (sigmoid of its evidence), else the module's own score.
    module_active: per module ref, ``[B, T]`` bool, where it ran at any layer (the router chose it).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    losses: dict[str, torch.Tensor] | None = None
    lm_tokens: torch.Tensor | None = None
    module_scores: Mapping[str, torch.Tensor] | None = None
    module_active: Mapping[str, torch.Tensor] | None = None
    heads: dict[str, Any] | None = None


@dataclass
class _ForwardState:
    attention_mask: torch.Tensor | None
    cache: Cache | None
    results: dict[int, StackResult]
    starts: torch.Tensor | None = None  # [B, T] bool: where a document begins (routing.document_starts)
    input_ids: torch.Tensor | None = None


# The forward in progress; lets each slot reach the mask and cache whatever the
# backbone's block signature is. A context variable, so nested or threaded
# forwards never see each other's state.
_CURRENT: ContextVar[_ForwardState | None] = ContextVar("dharma_forward", default=None)


class _Traced:
    """The forward in progress while torch.compile traces it: dynamo cannot trace a context
    variable (each ``get`` and ``set`` broke the graph), but follows a plain attribute. One per
    model; a compiled forward is the training loop's, never run by two threads at once."""

    state: _ForwardState | None = None


class DharmaSlot(nn.Module):
    """Runs one backbone block, then the module stack that sits after it."""

    def __init__(self, block: nn.Module, stack: ModuleStack, layer: int, traced: _Traced) -> None:
        super().__init__()
        self.block = block
        self.layer = layer
        # Registered under DharmaModel.stacks, not here: keeps module weights out of
        # the backbone's parameter names and out of the `backbone` freeze group.
        object.__setattr__(self, "stack", stack)
        self.traced = traced

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        # traced: the state a traced model forward left (None: the model's forward ran eagerly)
        state = self.traced.state if torch.compiler.is_compiling() else None
        if state is None:
            state = _CURRENT.get()
        mask = state.attention_mask if state is not None else None
        cache = state.cache if state is not None else None
        stack = self.stack
        starts = state.starts if state is not None else None
        ids = state.input_ids if state is not None else None
        if stack.gradient_checkpointing and stack.training and cache is None and torch.is_grad_enabled():
            result = checkpoint(stack, hidden, mask, None, starts, ids, use_reentrant=False)
        else:
            result = stack(hidden, mask, cache, starts, ids)
        if state is not None:
            state.results[self.layer] = result
        return (result.hidden, *out[1:]) if isinstance(out, tuple) else result.hidden


def plugin_config(cls: type[DharmaModule | HeadModule], values: dict[str, Any], where: str) -> ModuleConfig:
    """``cls.Config(**values)``, or a DharmaError naming each bad key under ``where``."""
    try:
        return cls.Config(**values)
    except ValidationError as err:
        raise DharmaError(format_validation_error(err, model=cls.Config, prefix=where)) from None


def _construct(cls: type[nn.Module], ref: str, hidden: int, config: ModuleConfig) -> Any:
    try:
        return cls(hidden, config)
    except DharmaError:
        raise
    except Exception as err:  # a config the plugin's own checks missed (say a negative size)
        raise DharmaError(f"{ref}: cannot build with {config!r}: {error_line(err)}") from None


def build_module(spec: dict[str, Any], hidden: int) -> DharmaModule:
    cls = registry.load(registry.resolve(spec["ref"], "module"))
    config = plugin_config(cls, spec.get("config", {}), f"layout.modules.{spec['ref']}")
    return _construct(cls, spec["ref"], hidden, config)


def build_head(spec: dict[str, Any], hidden: int) -> HeadModule:
    cls = registry.load(registry.resolve(spec["plugin"], "head"))
    config = plugin_config(cls, spec.get("config", {}), f"layout.heads.{spec['plugin']}")
    return _construct(cls, spec["plugin"], hidden, config)


class DharmaModel(PreTrainedModel, GenerationMixin):
    config_class = DharmaConfig
    base_model_prefix = "dharma"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # `loss` is a per-batch mean. Without this, transformers' Trainer sees **kwargs in forward,
    # assumes the loss is normalised over the whole accumulation window and stops dividing by
    # gradient_accumulation_steps: gradients and logged loss would grow with it.
    accepts_loss_kwargs = False

    def __init__(self, config: DharmaConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        text = config.text_config
        self.backbone = backbone if backbone is not None else fresh_backbone(text)
        layout = config.layout or {}
        width, depth = hidden_size(text), num_layers(text)
        blocks = find_blocks(self.backbone, depth)
        self.stacks = nn.ModuleDict()
        self._traced = _Traced()
        stream = depth  # module cache streams follow the backbone's own cache layers
        for layer in layout.get("at_layers", []):
            modules = [build_module(spec, width) for spec in layout.get("modules", [])]
            vocab = getattr(text, "vocab_size", 0) or 0
            share = (layout.get("loss") or {}).get("routing_backbone", 0.25)
            top_k, factor = layout.get("top_k", 2), layout.get("capacity_factor")
            stack = ModuleStack(modules, layout["composition"], top_k, width, vocab, share, factor)
            stack.stream_base, stream = stream, stream + stack.streams
            self.stacks[str(layer)] = stack
            blocks[layer] = DharmaSlot(blocks[layer], stack, layer, self._traced)
        self.heads = nn.ModuleDict(
            {spec["plugin"]: build_head(spec, width) for spec in layout.get("heads", [])}
        )
        tied = getattr(self.backbone, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict):
            self._tied_weights_keys = {f"backbone.{k}": f"backbone.{v}" for k, v in tied.items()}
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> DharmaModel:
        """Load a saved directory: safetensors only, every locked plugin installed."""
        from .checkpoint import check_directory, weights_path
        from .weights import check_fit

        check_directory(pretrained_model_name_or_path)
        kwargs["use_safetensors"] = True
        # transformers would fill missing tensors with fresh values and only log it, and raise a
        # bare RuntimeError on a wrong shape: collect both, and refuse them by name.
        wants_info = kwargs.pop("output_loading_info", False)
        resizing = kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        check_fit(
            weights_path(pretrained_model_name_or_path),
            _missing_after_token_tables(model, info["missing_keys"]),
            info["unexpected_keys"],
            [] if resizing else info["mismatched_keys"],
        )
        _align_tensors(model)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``, plus the model card (README.md): every save has one.

        Weights held stacked in training (:mod:`dharma_kernel.train.stacked`) are written from
        row-major copies on the CPU: a linear layer's weight is a transposed view there, which
        transformers' writer cannot read; only those are copied (tied tensors stay one)."""
        weights = kwargs.get("state_dict")
        weights = self.state_dict() if weights is None else weights
        if any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in weights.values()):
            kwargs["state_dict"] = {
                name: t.detach().cpu().contiguous()
                if isinstance(t, torch.Tensor) and not t.is_contiguous()
                else t
                for name, t in weights.items()
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .hub import write_card

            write_card(save_directory, self.config)

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None, **options: Any) -> Any:
        """Upload weights, config, tokenizer and the model card (the one ``checkpoint.save`` writes).

        ``tokenizer``: else the one saved where the model was loaded from. ``options``: as
        ``PreTrainedModel.push_to_hub`` (``private``, ``token``, ``commit_message``, ``revision``, ...).
        """
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, tokenizer=tokenizer, **options)

    @property
    def module_refs(self) -> list[str]:
        """Module refs in layout order: the column order of ``concept_labels``."""
        return [spec["ref"] for spec in (self.config.layout or {}).get("modules", [])]

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself and modules initialise in their constructors;
        # a second pass here would overwrite pretrained weights and zero-initialised outputs.
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def set_module_checkpointing(self, enabled: bool = True) -> None:
        """Recompute module stacks in backward instead of storing their activations."""
        for stack in self.stacks.values():
            stack.gradient_checkpointing = enabled

    def ready_for_compile(self) -> None:
        """Fill what the stacks cache per device before torch.compile traces a forward (see
        :meth:`ModuleStack.ready_for_compile`)."""
        device = next(self.parameters()).device
        for stack in self.stacks.values():
            stack.ready_for_compile(device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        concept_labels: torch.Tensor | None = None,
        head_labels: dict[str, dict[str, torch.Tensor]] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> DharmaOutput:
        """Causal LM forward with modules in place.

        concept_labels: ``[B, M]`` or ``[B, T, M]`` in {0, 1, -100}, columns in ``module_refs``
        order: supervises each module's activation score. head_labels: per head name,
        the keyword labels that head's forward takes.
        """
        if use_cache is None:
            use_cache = not self.training and bool(getattr(self.config.text_config, "use_cache", True))
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if use_cache and not isinstance(cache, DynamicCache):
            raise DharmaError(
                f"Dharma models generate with the dynamic KV cache only, not {type(cache).__name__}",
                hint="Leave cache_implementation unset (or 'dynamic').",
            )
        starts = document_starts(input_ids, getattr(self.config.text_config, "eos_token_id", None))
        state = _ForwardState(attention_mask, cache if use_cache else None, {}, starts, input_ids)
        want_hidden = bool(output_hidden_states) or len(self.heads) > 0
        compiling = torch.compiler.is_compiling()
        if compiling:
            self._traced.state = state
        else:
            token = _CURRENT.set(state)
        try:
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=cache if use_cache else None,
                use_cache=use_cache,
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                output_hidden_states=want_hidden,
                **kwargs,
            )
        finally:
            if compiling:
                self._traced.state = None
            else:
                _CURRENT.reset(token)

        losses: dict[str, torch.Tensor] = {}
        lm_tokens = None
        if labels is not None:
            losses["lm"], lm_tokens = lm_loss(out.logits, labels, attention_mask)
        scores, concept = self._module_scores(state, concept_labels)
        if concept is not None:
            losses["concept"] = concept
        for layer, result in state.results.items():
            for name, value in result.losses.items():
                losses[f"{name}@{layer}"] = value
            routing = self._routing_loss(state, result, concept_labels)
            if routing is not None:
                losses[f"routing@{layer}"] = routing
        head_outputs = self._run_heads(
            out.hidden_states[-1] if want_hidden else None, attention_mask, head_labels or {}, losses
        )
        loss = None
        # head features without targets (qa's context_mask when predicting) give no loss
        if "lm" in losses or "concept" in losses or any(o.losses for o in head_outputs.values()):
            loss = total_loss(losses, (self.config.layout or {}).get("loss", {}))
        return DharmaOutput(
            loss=loss,
            logits=out.logits,
            cache=cache if use_cache else None,
            hidden_states=self._with_module_outputs(out.hidden_states, state)
            if output_hidden_states
            else None,
            losses=losses,
            lm_tokens=lm_tokens,
            module_scores=scores,
            module_active=_where_active(self.module_refs, state) if state.results else None,
            heads=head_outputs or None,
        )

    def _with_module_outputs(
        self, hidden_states: tuple[torch.Tensor, ...], state: _ForwardState
    ) -> tuple[torch.Tensor, ...]:
        """Per-layer hidden states after the module stacks, not the bare block outputs transformers records.

        Entry ``l + 1`` is the output of block ``l``; the last entry is after the final norm, kept.
        """
        states = list(hidden_states)
        for layer, result in state.results.items():
            if layer + 1 < len(states) - 1:
                states[layer + 1] = result.hidden
        return tuple(states)

    def _module_scores(
        self, state: _ForwardState, concept_labels: torch.Tensor | None
    ) -> tuple[Mapping[str, torch.Tensor], torch.Tensor | None]:
        """Per module its score ``[B, T]``, averaged over its layers, and the concept loss: the mean,
        over every (layer, module) with a counted labelled token, of its binary cross-entropy.

        Every stack holds the model's modules in ``module_refs`` order (see ``__init__``), so each
        layer's results are one ``[B, T, M]`` table and the whole computation is a few ops.
        """
        refs = self.module_refs
        results = list(state.results.values())
        if not results:
            return {}, None
        shown = [
            torch.sigmoid(r.router_logits) if r.router_logits is not None else table_of(r.scores, refs)
            for r in results
        ]
        scores = Columns(refs, shown[0] if len(shown) == 1 else torch.stack(shown).mean(0))
        if concept_labels is None:
            return scores, None
        losses, has = [], []
        for result in results:
            counted = table_of(result.active, refs)
            if state.attention_mask is not None:
                counted = counted & state.attention_mask[:, -counted.shape[1] :, None].bool()
            loss, present = concept_losses(table_of(result.scores, refs), concept_labels, counted)
            losses.append(loss)
            has.append(present)
        loss, present = torch.cat(losses), torch.cat(has)
        # one host sync a step, not one per module; none while traced (a zero loss instead)
        if not torch.compiler.is_compiling() and not bool(present.any()):
            return scores, None
        # a module's loss is 0 where it has no counted token (see concept_losses): no product by present
        return scores, loss.sum() / present.sum().clamp_min(1)

    @staticmethod
    def _routing_loss(
        state: _ForwardState, result: StackResult, concept_labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        if result.router_logits is None or concept_labels is None:
            return None
        logits = result.router_logits
        real = real_tokens(state.attention_mask, logits)
        return routing_loss(logits, result.router_hits, concept_labels.to(logits.device), real)

    @contextmanager
    def switched_off(self, refs: Iterable[str]) -> Iterator[None]:
        """Within the block, the modules ``refs`` add nothing to the hidden states (ablation).

        Routing and scores are unchanged; the other modules keep their router weights.
        """
        refs = frozenset(refs)
        unknown = sorted(refs - set(self.module_refs))
        if unknown:
            raise DharmaError(
                f"not in this model: {', '.join(unknown)}", hint=f"It has: {', '.join(self.module_refs)}"
            )
        before = {name: stack.disabled for name, stack in self.stacks.items()}
        for stack in self.stacks.values():
            stack.disabled = refs
        try:
            yield
        finally:
            for name, stack in self.stacks.items():
                stack.disabled = before[name]

    def _run_heads(
        self,
        hidden: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        head_labels: dict[str, dict[str, torch.Tensor]],
        losses: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        outputs = {}
        for name, head in self.heads.items():
            result = head(hidden, attention_mask, **head_labels.get(name, {}))
            for loss_name, value in result.losses.items():
                losses[f"{name}/{loss_name}"] = value
            outputs[name] = result
        return outputs

    def module_at(self, ref: str, layer: int) -> DharmaModule:
        """The instance of module ``ref`` at ``layer``."""
        return self.stacks[str(layer)].members[module_key(ref)]


_TOKEN_TABLE = re.compile(r"stacks\.(\d+)\.(token_prior\.weight|prior_out)")


def _missing_after_token_tables(model: DharmaModel, missing: list[str]) -> list[str]:
    """``missing`` less the routers' token tables, which models saved before them lack: those
    stacks get a fresh table (its zero read-out changes nothing)."""
    tables = [key for key in missing if _TOKEN_TABLE.fullmatch(key)]
    for layer in {_TOKEN_TABLE.fullmatch(key).group(1) for key in tables}:
        model.stacks[layer].reset_token_table()
    return [key for key in missing if key not in tables]


def _where_active(refs: list[str], state: _ForwardState) -> Columns:
    """Per ref, ``[B, T]`` bool: the tokens where the module ran at any of its layers."""
    tables = [table_of(result.active, refs) for result in state.results.values()]
    return Columns(refs, functools.reduce(torch.logical_or, tables))


def _align_tensors(model: nn.Module, alignment: int = 64) -> None:
    """Copy weights that sit at an unaligned address (loaded from a mapped safetensors file at
    the offset its header left) into fresh, aligned memory.

    Kernels take other code paths, and sum in another order, on unaligned data: aligned, a
    loaded model computes bit for bit what the saved one did.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load saved Dharma directories."""
    AutoConfig.register(DharmaConfig.model_type, DharmaConfig, exist_ok=True)
    AutoModelForCausalLM.register(DharmaConfig, DharmaModel, exist_ok=True)


register_auto_classes()
