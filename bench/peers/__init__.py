"""The same 5-stage lifecycle (and its stage-4-fails-undo-1..3 variant) for each system compared.

Each module has ``client(variant, client, **kwargs)``: set up in a fresh process, warm up, and
return a callable that runs one execution (raising when it did not end as the variant expects).
"""
