"""LinearMethod.prefetch_tensor: the buffer a backend may ask L2 for ahead of a projection."""


def test_prefetch_tensor_is_the_layers_largest_weight():
    # what Attention hands the backend to prefetch ahead of wo: the dense weight, or an int4 layer's packed words
    import torch

    from engine.model.layers.linear import Linear
    from engine.quant.methods import Int4LinearMethod

    dense = Linear(64, 32, bias=True)
    assert dense.method.prefetch_tensor(dense) is dense.weight
    q = Linear(256, 64, method=Int4LinearMethod(128))
    assert q.method.prefetch_tensor(q) is q.qweight and q.qweight.dtype == torch.int32
