print("moecheck")
