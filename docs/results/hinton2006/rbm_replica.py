"""Hinton's rbm.m (the MATLAB code behind Hinton & Salakhutdinov 2006) line by line in plain
torch, trained on layer-2 features of a surgery stack, to see whether the 2000-unit top RBM
also goes dead at his learning rate outside surgery.

    python docs/results/hinton2006/rbm_replica.py STACK.safetensors [lr] [init] [epochs]

STACK: a depth-2 (or deeper) RBM stack of 784-500-500, e.g. runs/hinton2006/stacks/<key>/
depth2.safetensors. His settings: weights 0.1 * randn, zero biases, lr 0.1 for weights and
both biases, momentum 0.5 for 5 epochs then 0.9, weight cost 0.0002, fixed batches of 100,
hidden probabilities as the next layer's data. Prints each epoch's reconstruction error
per example and the fraction of hidden units stuck (surgery's `inactive_units`: std < 0.02
over the first 1000 rows, mean within 0.05 of 0 or 1).
"""

import sys

import torch
from safetensors.torch import load_file

from surgery.loaders import load_mnist


def main() -> None:
    stack = load_file(sys.argv[1])
    lr, init, epochs = (float(sys.argv[2]) if len(sys.argv) > 2 else 0.1,
                        float(sys.argv[3]) if len(sys.argv) > 3 else 0.1,
                        int(sys.argv[4]) if len(sys.argv) > 4 else 8)
    torch.manual_seed(0)
    x = load_mnist().train.x.view(-1, 784)
    h1 = torch.sigmoid(x @ stack["h1.weight"].t() + stack["h1.bias"])
    data = torch.sigmoid(h1 @ stack["h2.weight"].t() + stack["h2.bias"])
    n, nv, nh = data.shape[0], data.shape[1], 2000
    W, hb, vb = init * torch.randn(nv, nh), torch.zeros(nh), torch.zeros(nv)
    dW, dhb, dvb = torch.zeros_like(W), torch.zeros(nh), torch.zeros(nv)
    batches = data[torch.randperm(n)].view(-1, 100, nv)
    for epoch in range(1, epochs + 1):
        mom, err = (0.5 if epoch <= 5 else 0.9), 0.0
        for v in batches:
            ph = torch.sigmoid(v @ W + hb)
            h = (ph > torch.rand_like(ph)).float()
            neg_v = torch.sigmoid(h @ W.t() + vb)
            neg_h = torch.sigmoid(neg_v @ W + hb)
            err += ((v - neg_v) ** 2).sum().item()
            dW = mom * dW + lr * ((v.t() @ ph - neg_v.t() @ neg_h) / 100 - 0.0002 * W)
            dvb = mom * dvb + lr / 100 * (v.sum(0) - neg_v.sum(0))
            dhb = mom * dhb + lr / 100 * (ph.sum(0) - neg_h.sum(0))
            W += dW
            vb += dvb
            hb += dhb
        p = torch.sigmoid(data[:1000] @ W + hb)
        std, mean = p.std(0), p.mean(0)
        stuck = ((std < 0.02) & ((mean < 0.05) | (mean > 0.95))).float().mean().item()
        print(f"epoch {epoch} momentum {mom} recon error {err / n:.3f} inactive {stuck:.3f}", flush=True)


if __name__ == "__main__":
    main()
