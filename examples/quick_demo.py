"""A one-minute MDP-style run on generated data: a small conv net learns pixel embeddings
for two datasets with different taxonomies through PrototypeContrastLoss.

Dataset A labels shapes by colour (4 classes), dataset B by form (3 classes); their label
spaces are concatenated (7 classes, B offset by 4) with no mapping between them.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import mdp_kernels as mk

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])


def sample(batch: int, size: int, g: torch.Generator):
    """Images with one shape each on noise; labels in the concatenated space."""
    imgs = 0.2 * torch.randn(batch, 3, size, size, generator=g)
    labels = torch.full((batch, size, size), 255, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(batch):
        colour = int(torch.randint(4, (1,), generator=g))
        form = int(torch.randint(3, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=g))
        r = size // 5
        if form == 0:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif form == 1:
            m = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        else:
            m = ((yy - cy).abs() <= r // 2) | ((xx - cx).abs() <= r // 2)
            m &= ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        imgs[i][:, m] += COLOURS[colour][:, None]
        labels[i][m] = colour if i % 2 == 0 else 4 + form  # even: dataset A, odd: dataset B
        labels[i][~m & (torch.rand(size, size, generator=g) < 0.02)] = 255
    return imgs, labels


def main(seconds: float = 60.0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 16, 1))
    loss_fn = mk.PrototypeContrastLoss(7, 16, bank_images=64, batch_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    print(f"backends here: {mk.available_backends()}; training for {seconds:.0f} s")
    start, step, history = time.time(), 0, []
    while time.time() - start < seconds:
        imgs, labels = sample(8, 32, g)
        feats = F.normalize(net(imgs), dim=1)
        loss = loss_fn(feats, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"valid classes {int(loss_fn.last_terms['valid_classes'])}")
        step += 1
    first, last = history[:10], history[-10:]
    print(f"loss: first 10 steps {sum(first) / len(first):.4f} -> last 10 {sum(last) / len(last):.4f}")
    protos, valid = loss_fn.bank.prototypes()
    print(f"bank: {loss_fn.bank.num_slots} slots, {int(loss_fn.bank.num_updates)} updates, "
          f"valid classes {valid.tolist()}")
    sim = protos @ protos.t()
    print("prototype cosine similarity (A: 4 colours, B: 3 forms):")
    for row in sim:
        print("  " + " ".join(f"{v:+.2f}" for v in row.tolist()))


if __name__ == "__main__":
    main()
