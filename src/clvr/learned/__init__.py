"""The learned controller: a small causal LM that reads the loop's state as words and writes the next step.

tokens.py (vocabulary: state words in, JSON lexemes out), state.py (a LoopState as text), grammar.py
(constrained decoding), model.py (build / save / load), controller.py (the "learned" registry backend).
"""
