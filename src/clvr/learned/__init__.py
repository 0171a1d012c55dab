"""The learned controller: a small causal LM that reads the loop's state as words and writes the next step.

tokens.py (vocabulary: state words in, JSON lexemes out), state.py (a LoopState as text), grammar.py
(constrained decoding), model.py (build / save / load), controller.py (the "learned" registry backend).
At real scale: vlm.py (a Qwen3-VL that also reads the canvas image: model, processor, SFT hooks), vlm_controller.py
(that VLM as the "learned" controller: prefix-cached, constrained greedy decoding), textgrammar.py (the step grammar
over a pretrained BPE tokenizer's text).
"""
