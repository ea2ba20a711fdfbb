"""The decoder recurrence against hand-written formulas and torch's standard cells; shapes for every variant."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from captioner.config import DecoderConfig
from captioner.decoder import Decoder
from captioner.features import ImageFeatures
from captioner.model import CaptionModel
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


V, E, H, D = 11, 5, 6, 7  # vocab, embedding, hidden, image feature sizes: small enough to check by hand


def make_decoder(cell: str, inject: str = "every", num_layers: int = 1, learn_h0: bool = True,
                 seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(cell=cell, inject=inject, embed_dim=E, hidden_dim=H, num_layers=num_layers,
                        dropout=0.0, learn_h0=learn_h0)
    dec = Decoder(cfg, V, D).eval()
    with torch.no_grad():  # a non-zero h0 (and c0) so that the initial state is part of what is checked
        dec.h0.normal_(0, 0.5)
    return dec


def inputs(n: int = 3, t: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, D, generator=g)
    tokens = torch.randint(1, V, (n, t), generator=g)
    return v, tokens


# ------------------------------------------------------------------------------------------ the rnn formula

@pytest.mark.parametrize("inject", ["every", "first"])
def test_rnn_cell_is_the_formula(inject):
    """h_t = tanh(W_xh·x_t + W_hh·h_{t-1} + W_ih·v + b), logits = W_hy·h_t + b_y, with plain matmuls."""
    dec = make_decoder("rnn", inject)
    layer = dec.layers[0]
    W_xh, b = layer.W_xh.weight, layer.W_xh.bias  # (H, E), (H,)
    W_hh, W_ih = layer.W_hh.weight, layer.W_ih.weight  # (H, H), (H, D)
    assert layer.W_hh.bias is None  # the formula has a single bias b
    W_hy, b_y = dec.W_hy.weight, dec.W_hy.bias
    v, tokens = inputs()
    h = dec.h0[0, 0].expand(v.size(0), H)
    expected = []
    for t in range(tokens.size(1)):
        x_t = dec.embed.weight[tokens[:, t]]  # (N, E)
        image = v @ W_ih.T if (inject == "every" or t == 0) else 0.0
        h = torch.tanh(x_t @ W_xh.T + h @ W_hh.T + image + b)
        expected.append(h @ W_hy.T + b_y)
    expected = torch.stack(expected, 1)  # (N, T, V)
    with torch.no_grad():
        got = dec(ImageFeatures(v), tokens)
    assert got.shape == (3, 4, V)
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)


def test_rnn_two_layers_is_the_formula():
    """Layer 1 reads h^(0)_t and its own h^(1)_{t-1}; only layer 0 sees the image."""
    dec = make_decoder("rnn", num_layers=2)
    l0, l1 = dec.layers
    assert l1.W_ih is None
    v, tokens = inputs()
    h0, h1 = dec.h0[0, 0].expand(3, H), dec.h0[0, 1].expand(3, H)
    expected = []
    for t in range(tokens.size(1)):
        x_t = dec.embed.weight[tokens[:, t]]
        h0 = torch.tanh(x_t @ l0.W_xh.weight.T + h0 @ l0.W_hh.weight.T + v @ l0.W_ih.weight.T + l0.W_xh.bias)
        h1 = torch.tanh(h0 @ l1.W_xh.weight.T + h1 @ l1.W_hh.weight.T + l1.W_xh.bias)
        expected.append(h1 @ dec.W_hy.weight.T + dec.W_hy.bias)
    with torch.no_grad():
        got = dec(ImageFeatures(v), tokens)
    torch.testing.assert_close(got, torch.stack(expected, 1).detach(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ gru/lstm against torch's cells

def reference_cell(dec: Decoder, with_image: bool) -> nn.Module:
    """torch.nn.GRUCell/LSTMCell holding the decoder's weights; with_image: the cell reads [x_t, v] so that
    W_ih·v is exactly an extra term of the input pre-activation."""
    layer = dec.layers[0]
    cls = nn.GRUCell if dec.cfg.cell == "gru" else nn.LSTMCell
    cell = cls(E + D if with_image else E, H)
    with torch.no_grad():
        w = torch.cat([layer.W_xh.weight, layer.W_ih.weight], 1) if with_image else layer.W_xh.weight
        cell.weight_ih.copy_(w)
        cell.weight_hh.copy_(layer.W_hh.weight)
        cell.bias_ih.copy_(layer.W_xh.bias)
        cell.bias_hh.copy_(layer.W_hh.bias if layer.W_hh.bias is not None else torch.zeros_like(cell.bias_hh))
    return cell


def run_reference(dec: Decoder, cell: nn.Module, v: torch.Tensor, tokens: torch.Tensor,
                  with_image: bool) -> torch.Tensor:
    n = tokens.size(0)
    state = dec.h0[0, 0].expand(n, H)
    if dec.cfg.cell == "lstm":
        state = (state, dec.h0[1, 0].expand(n, H))
    outs = []
    for t in range(tokens.size(1)):
        x = dec.embed.weight[tokens[:, t]]
        if with_image:
            use_v = dec.cfg.inject == "every" or t == 0
            x = torch.cat([x, v if use_v else torch.zeros_like(v)], 1)
        state = cell(x, state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outs, 1)  # (N, T, H)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gate_layout_matches_torch_cells_without_image(cell):
    dec = make_decoder(cell)
    with torch.no_grad():
        dec.layers[0].W_ih.weight.zero_()
    v, tokens = inputs()
    with torch.no_grad():
        got = dec(ImageFeatures(v), tokens, return_hidden=True)
        want = run_reference(dec, reference_cell(dec, with_image=False), v, tokens, with_image=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("inject", ["every", "first"])
def test_image_term_is_added_to_input_preactivation(cell, inject):
    dec = make_decoder(cell, inject)
    v, tokens = inputs()
    with torch.no_grad():
        got = dec(ImageFeatures(v), tokens, return_hidden=True)
        want = run_reference(dec, reference_cell(dec, with_image=True), v, tokens, with_image=True)
        # and the image really matters (the check above would be vacuous with W_ih = 0)
        blind = run_reference(dec, reference_cell(dec, with_image=False), v, tokens, with_image=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got - blind).abs().max() > 1e-3


# -------------------------------------------------------------------- shapes, step == forward, injection

VARIANTS = [(c, i, n) for c in ("rnn", "gru", "lstm") for i in ("every", "first", "attention") for n in (1, 2)]


@pytest.mark.parametrize("cell,inject,num_layers", VARIANTS)
def test_shapes_and_step_equals_forward(cell, inject, num_layers):
    torch.manual_seed(0)
    cfg = tiny_model_config(cell, inject=inject, num_layers=num_layers)
    model = CaptionModel(cfg).eval()
    B, T, Vs = 2, 5, cfg.vocab_size
    images = torch.randn(B, 3, 32, 32)
    tokens = torch.randint(1, Vs, (B, T))
    with torch.no_grad():
        logits = model(images, tokens)
        assert logits.shape == (B, T, Vs)
        f = model.encode(images)
        assert {k: t.shape for k, t in f.named().items()} == {k: (B, *s) for k, s in cfg.feature_shapes.items()}
        assert f.fc.shape == (B, cfg.encoder.feature_dim)
        assert (f.att is None) == (inject != "attention") and (f.att is None or f.att.shape == (B, 64, 16))
        dec = model.decoder
        state = dec.init_state(B)
        n_states = 2 if cell == "lstm" else 1
        assert len(state) == n_states and all(s.shape == (num_layers, B, cfg.decoder.hidden_dim) for s in state)
        pre = dec.precompute(f)
        steps = []
        for t in range(T):
            out, state, _ = dec.step(tokens[:, t], state, pre, t)
            assert out.shape == (B, Vs)
            steps.append(out)
    assert (torch.stack(steps, 1) - logits).abs().max() < 1e-5
    # training mode: the same shapes, and gradients reach every parameter
    model.train()
    model(images, tokens).logsumexp(-1).sum().backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None]
    # an attention decoder reads the grid: the encoder's FC head (v, for the VQA head) is not on its path
    assert no_grad == ([k for k, _ in model.named_parameters() if k.startswith("encoder.classifier")]
                       if inject == "attention" else [])


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_inject_first_uses_v_at_step_zero_only(cell, num_layers):
    dec = make_decoder(cell, "first", num_layers)
    v, tokens = inputs()
    with torch.no_grad():
        pre = dec.precompute(ImageFeatures(v))
        other = dec.precompute(ImageFeatures(torch.randn_like(v)))
        ref = dec(ImageFeatures(v), tokens)
        # steps t > 0 are fed a different image: nothing changes
        state, outs = dec.init_state(3), []
        for t in range(tokens.size(1)):
            out, state, _ = dec.step(tokens[:, t], state, pre if t == 0 else other, t)
            outs.append(out)
        assert (torch.stack(outs, 1) - ref).abs().max() < 1e-5
        # ... while a different image at t = 0 changes the output
        out0, _, _ = dec.step(tokens[:, 0], dec.init_state(3), other, 0)
        assert (out0 - ref[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_inject_every_uses_v_at_every_step(cell):
    dec = make_decoder(cell, "every")
    v, tokens = inputs()
    with torch.no_grad():
        pre, other = dec.precompute(ImageFeatures(v)), dec.precompute(ImageFeatures(torch.randn_like(v)))
        ref = dec(ImageFeatures(v), tokens)
        state = dec.init_state(3)
        for t in range(tokens.size(1)):
            out, _, _ = dec.step(tokens[:, t], state, other, t)
            # the same state fed a different image gives a different output at every step
            assert (out - ref[:, t]).abs().max() > 1e-4, t
            _, state, _ = dec.step(tokens[:, t], state, pre, t)


def test_bad_decoder_config_is_rejected():
    with pytest.raises(ValueError, match="cell"):
        tiny_model_config("transformer")
    with pytest.raises(ValueError, match="inject"):
        tiny_model_config("rnn", inject="middle")
    with pytest.raises(ValueError, match="num_layers"):
        tiny_model_config("rnn", num_layers=0)


# -------------------------------------------------------------------------------------- learnable h0

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_learnable_h0_is_a_parameter_with_gradient(cell):
    dec = make_decoder(cell, num_layers=2, learn_h0=True)
    names = dict(dec.named_parameters())
    assert "h0" in names and names["h0"].requires_grad
    assert names["h0"].shape == (2 if cell == "lstm" else 1, 2, H)
    v, tokens = inputs()
    dec(ImageFeatures(v), tokens).sum().backward()
    assert dec.h0.grad is not None and dec.h0.grad.abs().sum() > 0
    if cell == "lstm":  # both h0 and c0 are learnt
        assert dec.h0.grad[1].abs().sum() > 0


def test_fixed_h0_is_a_buffer():
    dec = make_decoder("gru", learn_h0=False)
    assert "h0" not in dict(dec.named_parameters())
    assert "h0" in dict(dec.named_buffers())
    assert "h0" in dec.state_dict()  # saved with the checkpoint all the same
