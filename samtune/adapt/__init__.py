"""samtune.adapt"""
