using System.CommandLine;
using FrugalLM.Cli;

// Each command lives in its own file under Commands/ and returns its exit code:
// 0 ok, 1 failure, 2 bad usage or bad input, 3 the plan does not fit its budget.
var root = new RootCommand("FrugalLM: train, fine-tune and run LLaMA-family models in little memory, and know the memory before you run.");
foreach (var command in CommandCatalog.All())
{
    root.Subcommands.Add(command);
}
return await root.Parse(args).InvokeAsync();
