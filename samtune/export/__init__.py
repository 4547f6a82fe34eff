"""samtune.export"""
