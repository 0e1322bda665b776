"""What every layer above the models needs to run a network: the device and precision it runs in
(:mod:`mambamim.runtime.device`) and torch.compile with an eager fallback (:mod:`mambamim.runtime.compiling`).
Imports nothing of the package above ``models``, so ``engine``, ``inference`` and ``evaluation`` can share it."""
