"""training/model"""
