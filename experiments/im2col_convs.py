"""Convolutions as im2col (shifted slices concatenated) and one XLA dot, against oneDNN's direct
convolution, forward and forward+backward, on shapes of the full config at batch 8 (issue 31).

    python experiments/im2col_convs.py
"""
import time, numpy as np, jax, jax.numpy as jnp
from cnneb_jax import onednn
from cnneb_jax.onednn import axis_pads
shapes = [((8,17,17,192),(1,7,192,192),"SAME"), ((8,17,17,192),(7,1,192,192),"SAME"),
          ((8,35,35,64),(3,3,64,96),"SAME"), ((8,35,35,48),(5,5,48,64),"SAME"),
          ((8,8,8,384),(3,1,384,384),"SAME"), ((8,35,35,288),(3,3,288,384),"VALID2"),
          ((8,73,73,80),(3,3,80,192),"VALID"), ((8,147,147,32),(3,3,32,64),"SAME")]
def im2col_conv(x, w, stride, padding):
    kh, kw, c, o = w.shape
    n, h, wd, _ = x.shape
    oh, pt, pb = axis_pads(h, kh, stride, padding); ow, pl, pr = axis_pads(wd, kw, stride, padding)
    xp = jnp.pad(x, ((0,0),(pt,pb),(pl,pr),(0,0)))
    cols = [xp[:, i:i + (oh-1)*stride+1:stride, j:j + (ow-1)*stride+1:stride, :] for i in range(kh) for j in range(kw)]
    p = jnp.concatenate(cols, -1) if len(cols) > 1 else cols[0]
    return jnp.dot(p.reshape(-1, kh*kw*c), w.reshape(kh*kw*c, o)).reshape(n, oh, ow, o)
def t(f, *a, reps=7):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-s)
    return np.median(ts)*1e3
for xs, ws, pad in shapes:
    stride = 2 if pad == "VALID2" else 1; pad = "VALID" if pad == "VALID2" else pad
    x = jnp.asarray(np.random.default_rng(0).standard_normal(xs, np.float32))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(ws, np.float32) * 0.05)
    a = jax.jit(lambda x, w: onednn.conv(x, w, (stride, stride), pad))
    b = jax.jit(lambda x, w: im2col_conv(x, w, stride, pad))
    np.testing.assert_allclose(np.asarray(a(x, w)), np.asarray(b(x, w)), rtol=2e-3, atol=2e-3)
    ga = jax.jit(lambda x, w: jax.grad(lambda x, w: jnp.sum(a(x, w) ** 2), (0, 1))(x, w))
    gb = jax.jit(lambda x, w: jax.grad(lambda x, w: jnp.sum(b(x, w) ** 2), (0, 1))(x, w))
    print(xs, ws, pad, stride, f"fwd onednn {t(a,x,w):6.2f} im2col {t(b,x,w):6.2f} | fwd+bwd onednn {t(ga,x,w):6.2f} im2col {t(gb,x,w):6.2f} ms", flush=True)
