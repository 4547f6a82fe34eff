"""samtune.modeling"""
