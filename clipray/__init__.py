"""clipray"""
