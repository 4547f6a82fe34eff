"""samtune.prompts"""
