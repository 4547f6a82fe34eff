"""samtune.tasks"""
