"""defuser plugin: StepFun Step 3.5 / 3.7."""
