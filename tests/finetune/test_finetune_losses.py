"""SquareHead, KD and CE losses against direct element-by-element computations."""

import math

import torch
from hypothesis import given, settings, strategies as st

from sparseforge.finetune.losses import SQUAREHEAD_EPS, causal_ce_loss, kd_loss, shift_labels, squarehead_loss


def _squarehead_by_hand(student, teacher, mask):
    total = 0.0
    for s, t in zip(student, teacher):
        num, den, count = 0.0, 0.0, 0
        for b in range(mask.shape[0]):
            for i in range(mask.shape[1]):
                if mask[b, i] == 1:
                    num += float(((s[b, i] - t[b, i]) ** 2).sum())
                    den += float((t[b, i] ** 2).sum())
                    count += s.shape[-1]
        total += (num / count) / (den / count + SQUAREHEAD_EPS)
    return total


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16))
def test_squarehead_matches_definition_over_non_pad_tokens(layers, seqlen, batch, seed):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, seqlen, 6, generator=g) for _ in range(layers)]
    teacher = [torch.randn(batch, seqlen, 6, generator=g) * 3 for _ in range(layers)]
    mask = (torch.rand(batch, seqlen, generator=g) > 0.3).long()
    mask[0, 0] = 1
    got = squarehead_loss(student, teacher, mask).item()
    assert math.isclose(got, _squarehead_by_hand(student, teacher, mask), rel_tol=1e-4)


def test_squarehead_ignores_padding_and_sums_layers():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 8, generator=g) for _ in range(2)]
    t = [torch.randn(2, 4, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    base = squarehead_loss(s, t, mask)
    s2 = [x.clone() for x in s]
    s2[0][0, 3] += 100.0  # a padded position
    s2[1][1, 2:] -= 50.0
    assert torch.equal(squarehead_loss(s2, t, mask), base)
    parts = squarehead_loss(s[:1], t[:1], mask) + squarehead_loss(s[1:], t[1:], mask)
    assert torch.allclose(base, parts)  # summed over layers, not averaged
    assert squarehead_loss(t, t, mask).item() == 0.0


def test_squarehead_is_scale_invariant_per_layer():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g) * 10
    mask = torch.ones(1, 5)
    a = squarehead_loss([s], [t], mask)
    b = squarehead_loss([s * 7], [t * 7], mask)
    assert torch.allclose(a, b, rtol=1e-3)  # normalised by the teacher's mean square (up to eps)


def test_kd_loss_is_t2_kl_teacher_student_per_token():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    for temp in (1.0, 2.0):
        p = torch.softmax(t / temp, -1)
        q = torch.softmax(s / temp, -1)
        expected = temp**2 * (p * (p.log() - q.log())).sum(-1).mean()
        assert torch.allclose(kd_loss(s, t, temp), expected, atol=1e-6)
    assert kd_loss(t, t, 2.0).abs().item() < 1e-6


def test_shift_labels_and_ce():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = shift_labels(ids, mask)
    assert labels.tolist() == [[6, 7, 8, -100], [2, 3, -100, -100]]
    logits = torch.randn(2, 4, 10)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(causal_ce_loss(logits, labels), expected)
