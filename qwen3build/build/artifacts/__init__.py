"""Build bodies, one module per kind of artifact. Each exposes `build(inputs, outputs)`:
`inputs` is a declared.BuildInputs (the artifact's declared values, tensors, files and
upstream outputs, nothing else), `outputs` maps each output name to the path to write.
A module's code closure is part of its artifact's key, so these modules import only
what makes the bytes: never the plan, the settings reader or the cache."""
