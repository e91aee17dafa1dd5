"""llama.cpp's own video path, as `llama-mtmd-cli --video` runs it, driven through llama-cpp-python's libmtmd.

The same calls in the same order as mtmd-cli.cpp (vendored llama.cpp, tools/mtmd): `mtmd_helper_bitmap_init_from_file`
(which pipes the clip through the `ffmpeg` binary at `fps_target` and yields every frame, merged in pairs for
Qwen-VL, with a text timestamp every 5 s), `mtmd_tokenize` of the chat-formatted prompt with the media marker,
`mtmd_helper_eval_chunks` (encode and prefill every visual token), then greedy decoding. Used by bench/peer.py where
the llama-mtmd-cli binary is not built; prints one JSON line: seconds from the start of work on the video to the
first answer token and to the last, and the prompt's token count.

    python bench/peer_mtmd.py model.gguf mmproj.gguf clip.mp4 "question" --fps 2 --ctx 4096 -n 8 -t 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("video")
    ap.add_argument("question")
    ap.add_argument("--fps", type=float, default=4.0, help="mtmd-cli's --video-fps (default 4)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2048, help="mtmd-cli's -b (default 2048)")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("-t", type=int, default=1)
    args = ap.parse_args()

    import llama_cpp as ll
    from llama_cpp import mtmd_cpp as mt

    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(args.model.encode(), mparams)
    cparams = ll.llama_context_default_params()  # flash attention: llama.cpp's default (auto), as mtmd-cli
    cparams.n_ctx, cparams.n_batch = args.ctx, args.batch
    cparams.n_threads = cparams.n_threads_batch = args.t
    lctx = ll.llama_init_from_model(model, cparams)
    vparams = mt.mtmd_context_params_default()
    vparams.use_gpu, vparams.n_threads = False, args.t
    mctx = mt.mtmd_init_from_file(args.mmproj.encode(), model, vparams)
    if not (model and lctx and mctx):
        sys.exit("could not load the model, context or mmproj")
    vocab = ll.llama_model_get_vocab(model)

    t0 = time.perf_counter()
    opt = mt.mtmd_helper_init_opt_default()
    opt.video_params.fps_target = args.fps
    media = mt.mtmd_helper_bitmap_init_from_file_wrapper(mctx, args.video.encode(), False, opt)
    if not media.bitmap:
        sys.exit("mtmd could not load the video (is ffmpeg on PATH?)")
    marker = mt.mtmd_default_marker().decode()
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{marker}{args.question}<|im_end|>\n<|im_start|>assistant\n"
    ).encode()
    text = mt.mtmd_input_text(prompt, len(prompt), True, True)
    chunks = mt.mtmd_input_chunks_init()
    bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(media.bitmap)
    if mt.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        sys.exit("mtmd_tokenize failed")
    n_tokens = mt.mtmd_helper_get_n_tokens(chunks)
    if n_tokens + args.n > args.ctx:  # what mtmd-cli meets as a failed decode once the KV cache is full
        sys.exit(f"context overflow: the prompt is {n_tokens} tokens, the context {args.ctx}")
    n_past = ll.llama_pos(0)
    if mt.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, args.batch, True, ctypes.byref(n_past)) != 0:
        sys.exit("mtmd_helper_eval_chunks failed")
    tokens, t_first = [], None
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    for _ in range(args.n):
        tok = int(np.ctypeslib.as_array(ll.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).argmax())
        if t_first is None:
            t_first = time.perf_counter() - t0
        if ll.llama_vocab_is_eog(vocab, tok):
            break
        tokens.append(tok)
        one = (ll.llama_token * 1)(tok)
        if ll.llama_decode(lctx, ll.llama_batch_get_one(one, 1)) != 0:
            sys.exit("decode failed")
    total = time.perf_counter() - t0
    print(json.dumps({"ttft_s": t_first, "total_s": total, "prompt_tokens": n_tokens, "answer_token_ids": tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
