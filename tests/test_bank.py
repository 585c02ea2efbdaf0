"""PrototypeBank: ring buffer semantics, prototypes, state_dict round trip."""
import pytest
import torch

import mdp_kernels as mk
from helpers import IGNORE
from mdp_kernels import PrototypeBank


def batch(labels_per_image, d=4, hw=(2, 3), dtype=torch.float64):
    b = len(labels_per_image)
    f = torch.randn(b, d, *hw, dtype=dtype)
    y = torch.stack([torch.as_tensor(l).reshape(hw) for l in labels_per_image])
    return f, y


def expected_slot(f, y, c):
    means, present = mk.masked_average_pool(f, y, c, backend="reference")
    return (means * present[..., None]).sum(0), present.sum(0).double()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_ring_buffer_and_prototypes(backend):
    bank = PrototypeBank(4, 4, 2, dtype=torch.float64, backend=backend)
    assert not bank.prototypes()[1].any()  # classes never seen are invalid
    b1 = batch([[0, 0, 1, 1, IGNORE, 0], [0, 2, 2, 2, 2, 2]])
    b2 = batch([[1, 1, 1, 1, 1, 1], [IGNORE] * 6])
    b3 = batch([[3, 3, 3, 0, 0, 0], [3] * 6])
    bank.update(*b1)
    assert int(bank.ptr) == 1
    p, valid = bank.prototypes(normalize=False)
    s1, n1 = expected_slot(*b1, 4)
    assert valid.tolist() == [True, True, True, False]  # class 0 is a class like any other
    torch.testing.assert_close(p[:3], s1[:3] / n1[:3, None])
    assert not p[3].any()
    bank.update(*b2)
    assert int(bank.ptr) == 0
    s2, n2 = expected_slot(*b2, 4)
    p, _ = bank.prototypes(normalize=False)
    torch.testing.assert_close(p[1], (s1[1] + s2[1]) / (n1[1] + n2[1]))
    bank.update(*b3)  # evicts b1, the oldest slot
    assert int(bank.ptr) == 1 and int(bank.num_updates) == 3
    s3, n3 = expected_slot(*b3, 4)
    p, valid = bank.prototypes(normalize=False)
    assert valid.tolist() == [True, True, False, True]
    torch.testing.assert_close(p[0], s3[0] / n3[0])
    torch.testing.assert_close(p[1], s2[1] / n2[1])
    pn, _ = bank.prototypes()
    torch.testing.assert_close(pn[valid].norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_state_dict_round_trips_exactly():
    bank = PrototypeBank(5, 4, 3)
    for _ in range(4):
        bank.update(*batch([[0, 1, 2, 3, 4, IGNORE]] * 2, dtype=torch.float32))
    other = PrototypeBank(5, 4, 3)
    other.load_state_dict(bank.state_dict())
    for k, v in bank.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert torch.equal(bank.prototypes()[0], other.prototypes()[0])
    with pytest.raises(RuntimeError, match="size mismatch"):
        PrototypeBank(6, 4, 3).load_state_dict(bank.state_dict())


def test_no_autograd_history_and_bad_input():
    bank = PrototypeBank(3, 4, 2)
    f, y = batch([[0, 1, 2, 0, 1, 2]], dtype=torch.float32)
    bank.update(f.requires_grad_(), y)
    assert not bank.slot_sums.requires_grad and bank.prototypes()[0].grad_fn is None
    with pytest.raises(ValueError, match="key_feats must be"):
        bank.update(torch.randn(1, 3, 2, 3), y)
    with pytest.raises(ValueError, match="label value 7"):
        bank.update(f, torch.full_like(y, 7))
    with pytest.raises(ValueError, match="num_slots"):
        PrototypeBank(3, 4, 0)
