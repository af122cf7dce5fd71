"""Stage 7: running a published stack. packages.py opens one package (Core ML on macOS,
the evaluator anywhere); backends.py chains a stack's packages (or the torch reference);
generate.py is the host loop; text.py the tokenizer, chat template and streaming.
Everything starts from a stack description (qwen3build/stack.py), never from the build."""
