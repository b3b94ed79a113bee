import ArgumentParser

struct Goldens: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "(not yet available)")
    func run() throws { throw ToolFailure("moecheck goldens: not implemented yet") }
}
