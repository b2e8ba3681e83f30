"""The ops of pyrl on one engine: ``plan`` (which implementation a call runs, decided once),
``walk`` (the one chunk walk and its GEMMs), the op families (``logprobs``, ``policy_loss``,
``fused_policy_loss``, ``preference``, ``distill``, ``vocab_parallel``) and ``explain``. See the README's architecture section."""
