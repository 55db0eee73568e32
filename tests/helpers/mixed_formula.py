"""A mixed-adapter batch's output written out token by token: what the batched paths must equal."""
import torch.nn.functional as F


def by_hand(k):
    """y + (B_s·A_s·x + lora bias_s)·scaling_s for each token of slot s (no change for slot -1 or a rank-0 slot); with
    DoRA scale rows c (k["c"], optional), PEFT's y + (c_s - 1)·(y - base bias) + c_s·delta instead. `k` holds x, y, a,
    b, ranks, scal, lb, c, bb and meta."""
    y = k["y"].clone()
    for t, s in enumerate(k["meta"].token_slots.tolist()):
        r = int(k["ranks"][s]) if s >= 0 else 0
        if r == 0:
            continue
        d = F.linear(F.linear(k["x"][t], k["a"][s, :r]), k["b"][s, :, :r])
        if k["lb"] is not None:
            d = d + k["lb"][s]
        d = d * k["scal"][s]
        if k["c"] is None:
            y[t] = k["y"][t] + d
            continue
        base = k["y"][t] - (k["bb"] if k["bb"] is not None else 0)
        y[t] = k["y"][t] + (k["c"][s] - 1) * base + k["c"][s] * d
    return y
