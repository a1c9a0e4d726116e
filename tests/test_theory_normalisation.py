r"""Lemma 2 of the paper: in an MLP, a weight W_l below an ℓ2-norm or LayerNorm layer keeps its
Frobenius norm under gradient flow, whatever the loss: d/dt ||W_l||_F² = −2⟨∂L/∂W_l, W_l⟩ = 0.

The reason: the output is unchanged by W_l → c·W_l (c > 0) when every operation between W_l and
the normalisation is positively homogeneous (bias-free linear maps, ReLU), so ⟨∂L/∂W_l, W_l⟩ =
dL(cW_l)/dc at c = 1 = 0. The tests check the inner product on fresh random float64 networks
and losses, for LayerNorm and for ReLU MLPs (the ℓ2-normalised deep linear case is in
tests/test_theory_deep_linear.py), with controls where the statement does not apply (a layer
above the normalisation, biases below it) that must show a clearly non-zero inner product.
"""
import pytest
import torch

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_norm(f):
    """The paper's LayerNorm (Sec. 4.2): (f − mean(f)) / std(f) per sample, no ε, no affine."""
    centred = f - f.mean(1, keepdim=True)
    return centred / centred.pow(2).mean(1, keepdim=True).sqrt()


def l2_norm(f):
    return f / f.norm(dim=1, keepdim=True)


def _network(gen, dims):
    return [torch.randn(dims[l + 1], dims[l], dtype=DT, generator=gen).requires_grad_(True) for l in range(len(dims) - 1)]


def _any_loss(z, gen):
    """An arbitrary smooth loss of the outputs (Lemma 2 holds 'regardless of loss function')."""
    r = torch.randn(z.shape[1], 3, dtype=DT, generator=gen)
    return 0.1 * (torch.sin(z @ r) * torch.linspace(0.5, 2.0, 3, dtype=DT)).sum() + (z ** 2).sum()


def _cosines(loss, ws):
    grads = torch.autograd.grad(loss, ws)
    return [float((g * w.detach()).sum() / (g.norm() * w.detach().norm())) for g, w in zip(grads, ws)]


def _forward(x, ws, layout, biases=None):
    """Apply `layout`, a string of ops: 'W' = next weight, 'r' = ReLU, 'n' = LayerNorm, 'l' = ℓ2."""
    f, k = x, 0
    for op in layout:
        if op == "W":
            f = f @ ws[k].T
            if biases is not None and biases[k] is not None:
                f = f + biases[k]
            k += 1
        elif op == "r":
            f = torch.relu(f)
        elif op == "n":
            f = layer_norm(f)
        elif op == "l":
            f = l2_norm(f)
    return f


CASES = {
    # layout: (which weights are below a normalisation layer)
    "linear, LayerNorm in the middle": ("WWnW", (True, True, False)),
    "ReLU MLP, LayerNorm in the middle": ("WrWnrW", (True, True, False)),
    "ReLU MLP, l2 at the output": ("WrWrWl", (True, True, True)),
    "ReLU MLP, LayerNorm then l2": ("WrWnrWl", (True, True, True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lemma2_gradient_is_orthogonal_to_every_weight_below_a_normalisation(case, gen):
    layout, below = CASES[case]
    ws = _network(gen, [7, 24, 16, 4])
    x = torch.randn(16, 7, dtype=DT, generator=gen)
    cosines = _cosines(_any_loss(_forward(x, ws, layout), gen), ws)
    for cos, is_below in zip(cosines, below):
        if is_below:
            assert abs(cos) < 1e-11, (case, cosines)
        else:  # control: the top weight has no normalisation above it
            assert abs(cos) > 1e-6, (case, cosines)


def test_lemma2_needs_positive_homogeneity_below_the_normalisation(gen):
    """Control: a bias between W_1 and the LayerNorm breaks the scale invariance of W_1."""
    ws = _network(gen, [7, 24, 16, 4])
    x = torch.randn(16, 7, dtype=DT, generator=gen)
    biases = [torch.randn(24, dtype=DT, generator=gen), None, None]
    cosines = _cosines(_any_loss(_forward(x, ws, "WrWnrW", biases), gen), ws)
    assert abs(cosines[0]) > 1e-6, cosines
    assert abs(cosines[1]) < 1e-11, cosines  # W_2 still has only the LayerNorm above it
