"""The Triton kernels (model/kernels.py) give the results of the PyTorch spellings they replace.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, which must be set before Triton is
imported), so those checks run in a child process. They need Triton, which PyTorch's CUDA builds ship and the CPU
build does not: where it is missing they are skipped; on a GPU, benchmarks/gpu_train.py checks the compiled
kernel against the compiled PyTorch expression.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmscratch.model.dispatch import triton_kernels

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (the CPU build of PyTorch does not ship it)")


def _run_child(code: str, interpret: bool) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _run_interpreted(code: str) -> str:
    return _run_child(code, interpret=True)


@needs_triton
def test_kernel_equals_pytorch_spelling_with_padding_columns():
    _run_interpreted("""
        import itertools
        import torch
        from llmscratch.model.loss import _losses_and_logit_grads
        from llmscratch.model.kernels import _cross_entropy_rows_kernel, _launch, cross_entropy_rows

        torch.manual_seed(0)
        # Both walk-1 schemes at two block widths, and the op's own setting; shapes with padding columns, one
        # vocabulary narrower than a block (lanes that see only padding) and one of exactly two blocks.
        settings = [dict(BLOCK=b, LANEWISE=lane) for b in (256, 1024) for lane in (False, True)] + [None]
        shapes = ((5, 3000, 2990), (3, 2048, 2048), (2, 2500, 2049), (3, 1000, 700))
        for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
            for meta, (rows, n_cols, vocab) in itertools.product(settings, shapes):
                z = (torch.randn(rows, n_cols) * 3).to(dtype)
                y = torch.randint(0, vocab, (rows,))
                y[0] = vocab - 1  # the last real column
                if meta is None:
                    losses, grad = cross_entropy_rows(z, y, vocab)
                else:
                    losses, grad = _launch(z, y, vocab, _cross_entropy_rows_kernel, **meta)
                want_l, want_g = _losses_and_logit_grads(z.clone(), y, vocab, True, one_pass=True)
                assert grad.dtype == dtype and grad.shape == z.shape
                torch.testing.assert_close(losses, want_l, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(grad.float(), want_g, atol=atol, rtol=0)
                assert grad[:, vocab:].eq(0).all()  # padding: no probability, no gradient
                # each row's gradient sums to 0 (softmax sums to 1, minus the one-hot)
                torch.testing.assert_close(grad.float().sum(1), torch.zeros(rows), atol=50 * atol, rtol=0)
    """)


@needs_triton
def test_fused_loss_through_the_kernel_equals_reference():
    # The CUDA dispatch pointed at the interpreted kernel for CPU tensors: chunking, padding to 64 columns and
    # ignored rows around it, against the plain logits + cross-entropy.
    _run_interpreted("""
        import torch
        import llmscratch.model.kernels as K
        import llmscratch.model.loss as L

        used = []
        L.triton_kernels = lambda logits: used.append(1) or K
        torch.manual_seed(0)
        h = torch.randn(40, 16, requires_grad=True)
        w = (torch.randn(1000, 16) * 0.3).requires_grad_()
        y = torch.randint(0, 1000, (40,))
        y[3] = y[7] = -100
        loss = L.lm_head_cross_entropy(h, w, y, chunk_size=16, pad_vocab_to=64)
        got = torch.autograd.grad(loss, (h, w))
        ref = L.lm_head_cross_entropy_reference(h, w, y)
        want = torch.autograd.grad(ref, (h, w))
        assert len(used) == 3, used  # one call per chunk
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.autograd.grad(L.lm_head_cross_entropy(h, w, y, chunk_size=16, use_kernel=False), (h, w))
        assert len(used) == 3, used  # asked not to: the PyTorch expressions
    """)


@needs_triton
def test_gelu_bias_forward_and_backward_equal_pytorch():
    _run_interpreted("""
        import torch
        import torch.nn.functional as F
        from llmscratch.model.kernels import gelu_bias

        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((37, 300), (2, 5, 130), (64, 256)):  # rows and columns not multiples of the tiles
                h = (torch.randn(shape) * 3).to(dtype).requires_grad_()
                b = torch.randn(shape[-1], requires_grad=True)
                go = torch.randn(shape).to(dtype)
                out = gelu_bias(h, b)
                got = (out, *torch.autograd.grad(out, (h, b), go))
                ref = F.gelu(h.float() + b, approximate="tanh")
                want = (ref, *torch.autograd.grad(ref, (h, b), go.float()))
                assert [t.dtype for t in got] == [dtype, dtype, torch.float32]
                for a, w in zip(got, want):
                    if dtype == torch.float32:
                        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
                    else:  # bf16 output: within its rounding of the largest values
                        assert (a.float() - w).abs().max() <= 1e-2 * w.abs().max(), (a, w)
    """)


@needs_triton
def test_gelu_mlp_through_the_kernel_equals_pytorch():
    # GELUMLP with the kernel on in eager calls too and the CUDA dispatch pointed at the interpreted kernels, against
    # the default, where eager calls keep the PyTorch path; a LoRA-wrapped fc keeps it too (the kernel would miss
    # the LoRA update).
    _run_interpreted("""
        import torch
        import llmscratch.model.kernels as K
        import llmscratch.model.layers as layers
        from llmscratch.lora import LoRALinear

        used = []
        layers.triton_kernels = lambda t: used.append(1) or K
        torch.manual_seed(0)
        mlp = layers.GELUMLP(32, 128)
        x = torch.randn(3, 7, 32, requires_grad=True)
        want = mlp(x)
        want_grads = torch.autograd.grad(want.sum(), [x, *mlp.parameters()])
        assert not used  # by default only compiled training steps use it, not eager calls
        mlp.options.gelu_kernel = "always"  # (a model changes it with GPT.set_options)
        got = mlp(x)
        got_grads = torch.autograd.grad(got.sum(), [x, *mlp.parameters()])
        assert len(used) == 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, w in zip(got_grads, want_grads):
            torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)
        mlp.fc = LoRALinear(mlp.fc, rank=2, alpha=4.0)
        mlp(x)
        assert len(used) == 1
    """)


@needs_triton
def test_qkv_projection_equals_split_linear():
    # Multi-head and grouped-query shapes, sequence lengths that do not fill the last row tile; the q, k, v views
    # and the gradients for x, W and the bias against autograd through F.linear + split.
    _run_interpreted("""
        import torch
        import torch.nn.functional as F
        from llmscratch.model.kernels import qkv_projection

        torch.manual_seed(0)
        for B, T, d, nh, nkv, hs in ((2, 37, 48, 4, 4, 16), (1, 5, 64, 4, 2, 16), (3, 70, 32, 2, 1, 32)):
            width = (nh + 2 * nkv) * hs
            x = torch.randn(B, T, d, requires_grad=True)
            w = torch.randn(width, d, requires_grad=True)
            b = torch.randn(width, requires_grad=True)
            got = qkv_projection(x, w, b, nh, nkv, hs)
            parts = F.linear(x, w, b).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
            want = [t.view(B, T, -1, hs).transpose(1, 2) for t in parts]
            seeds = [torch.randn_like(t) for t in want]
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c)
            got_grads = torch.autograd.grad(got, (x, w, b), seeds)
            want_grads = torch.autograd.grad(want, (x, w, b), seeds)
            for a, c in zip(got_grads, want_grads):
                torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-5)
    """)


@needs_triton
def test_attention_through_the_qkv_kernel_equals_pytorch():
    _run_interpreted("""
        import torch
        import llmscratch.model.attention as attention
        import llmscratch.model.kernels as K
        from llmscratch.lora import LoRALinear

        used = []
        attention.triton_kernels = lambda t: used.append(1) or K
        torch.manual_seed(0)
        attn = attention.CausalSelfAttention(d_model=64, n_heads=4, n_kv_heads=4)
        x = torch.randn(2, 9, 64, requires_grad=True)
        want = attn(x)
        want_grads = torch.autograd.grad(want.sum(), [x, *attn.parameters()])
        assert not used  # off by default
        attn.options.qkv_kernel = True  # (a model changes it with GPT.set_options)
        got = attn(x)
        got_grads = torch.autograd.grad(got.sum(), [x, *attn.parameters()])
        assert len(used) == 1
        torch.testing.assert_close(got, want)
        for a, c in zip(got_grads, want_grads):
            torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-5)
        with torch.no_grad():
            attn(x)  # no gradient wanted: the plain path
        attn.qkv = LoRALinear(attn.qkv, rank=2, alpha=4.0)
        attn(x)  # LoRA-wrapped: the plain path, which sees the LoRA update
        assert len(used) == 1
    """)


def test_kernels_are_only_dispatched_on_cuda():
    assert triton_kernels(torch.randn(2, 8)) is None  # a CPU tensor: the PyTorch spellings


def test_the_gelu_kernel_is_wanted_only_in_compiled_training_steps():
    # The default asks for the kernel where it was measured faster: traced by torch.compile with gradients on
    # (the trainer's CUDA step). Eager calls and compiled decoding (no gradients) keep the PyTorch spelling.
    from llmscratch.model import ModelOptions, layers

    assert ModelOptions().gelu_kernel == "compiled"
    seen = []

    def probe(x):
        seen.append(layers._gelu_kernel_wanted("compiled"))
        return x + 1

    torch._dynamo.reset()
    try:
        probe(torch.ones(2))
        torch.compile(probe, backend="eager", fullgraph=True)(torch.ones(3))
        with torch.no_grad():
            torch.compile(probe, backend="eager", fullgraph=True)(torch.ones(4))
    finally:
        torch._dynamo.reset()
    assert seen == [False, True, False], seen
    assert layers._gelu_kernel_wanted("always") and not layers._gelu_kernel_wanted("never")


@needs_triton
def test_gpt_training_step_with_all_kernels_equals_pytorch():
    # A small GPT-2-shaped model, loss and gradients of every parameter, with the three kernels switched on
    # (dispatch pointed at the interpreted kernels) against all of them off.
    _run_interpreted("""
        import torch
        import llmscratch.model.attention as attention
        import llmscratch.model.kernels as K
        import llmscratch.model.layers as layers
        import llmscratch.model.loss as loss
        from llmscratch import GPT, ModelConfig

        torch.manual_seed(0)
        model = GPT(ModelConfig(name="t", vocab_size=300, context_length=16, d_model=64, n_layers=2, n_heads=4))
        x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
        y[0, :3] = -100

        def loss_and_grads():
            out = model(x, targets=y)
            return [out, *torch.autograd.grad(out, list(model.parameters()))]

        want = loss_and_grads()
        calls = []
        for module in (attention, layers, loss):
            module.triton_kernels = lambda t: calls.append(1) or K
        model.set_options(qkv_kernel=True, gelu_kernel="always")
        got = loss_and_grads()
        assert len(calls) >= 2 * 2 + 1, calls  # q/k/v and GELU in both layers, the loss
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    """)


@needs_triton
def test_training_step_with_all_kernels_traces_as_one_compiled_graph():
    # What the trainer runs on CUDA — `torch.compile(model)`, bf16 autocast, the bf16 residual stream — with the
    # three kernels on, traced by Dynamo and AOTAutograd without a GPU: the real (compiled, not interpreted)
    # kernels, whose launches tracing records but never runs. fullgraph=True fails on any graph break; the joint
    # forward + backward graph must hold each kernel once per use. (Under the interpreter this cannot be checked:
    # its kernels are plain Python functions that Dynamo runs on fake tensors.) What it leaves to a GPU: inductor's
    # code generation for the graph and the kernels' speed (benchmarks/gpu_train.py).
    out = _run_child("""
        import collections
        import torch
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import default_partition
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        import llmscratch.model.attention as attention
        import llmscratch.model.kernels as K
        import llmscratch.model.layers as layers
        import llmscratch.model.loss as loss
        from llmscratch import GPT, ModelConfig

        joint = []

        def partition(gm, *args, **kwargs):
            joint.append(gm)
            return default_partition(gm, *args, **kwargs)

        class Traced(Exception):
            pass

        def not_run(gm, example_inputs):  # the graphs are only traced: Triton cannot launch on a CPU
            def run(*args):
                raise Traced
            return run

        backend = aot_autograd(fw_compiler=not_run, bw_compiler=not_run, partition_fn=partition)
        torch.manual_seed(0)
        n_layers = 2
        model = GPT(ModelConfig(name="t", vocab_size=300, context_length=16, d_model=64, n_layers=n_layers,
                                n_heads=4))
        model.set_options(low_precision_residual=True)
        x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
        for module in (attention, layers, loss):
            module.triton_kernels = lambda t: K
        model.set_options(qkv_kernel=True)  # the GELU and loss kernels are on by default in compiled training steps
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.compile(model, backend=backend, fullgraph=True)(x, targets=y)
        except Traced:
            pass
        assert len(joint) == 1, joint
        launched = collections.Counter(
            kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            for node in joint[0].graph.nodes if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional)
        assert launched == {"_gelu_bias_kernel": n_layers, "_gelu_bias_backward_kernel": n_layers,
                            "_heads_to_rows_kernel": 3 * n_layers, "_cross_entropy_rows_kernel": 1}, launched
        print(dict(launched))
    """, interpret=False)
    assert "_heads_to_rows_kernel" in out
