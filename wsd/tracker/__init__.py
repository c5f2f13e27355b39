"""Working-set tracking policy: which pages are hot, which are cold.

Nothing here calls ioctl; it drives :mod:`wsd.kernel`.
"""
