"""Plain-Python reference math for the methods' formula tests: lists, loops and `math` only, never the code under test
nor torch (except `t`, which turns a hand-made list into the tensor a method is fed)."""
from __future__ import annotations

import math

import torch


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def linear(W, b, x):
    return [dot(row, x) + (b[i] if b else 0.0) for i, row in enumerate(W)]


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    z = sum(e)
    return [x / z for x in e]


def log_softmax(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def ce(logits, y):
    return -log_softmax(logits)[y]


def mean(v):
    return sum(v) / len(v)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)
