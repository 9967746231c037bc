"""What a trained model is judged by: evaluation and its metrics, localization, figures, the
report tables and page, and predictions for new files.
"""
