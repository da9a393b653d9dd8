// Command dashboard-schema checks Grafana dashboard JSON files against Grafana's own dashboard types
// (grafana-foundation-sdk, generated from Grafana's schema): each file is decoded strictly, so a
// missing required field, a field of the wrong type or a field the schema does not know fails, down
// to each panel's plugin options and each Prometheus query. It prints one line per file and exits 1
// when any file does not conform. Usage: go run . FILE...
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// failed says whether a strict decode failed. The SDK's generated decoders return their error list as
// `error` even when it is empty (a nil cog.BuildErrors in a non-nil interface), so an empty list is
// success.
func failed(err error) bool {
	var list cog.BuildErrors
	if errors.As(err, &list) {
		return len(list) > 0
	}
	return err != nil
}

func check(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var board dashboard.Dashboard
	if err := board.UnmarshalJSONStrict(raw); failed(err) {
		return fmt.Errorf("does not decode strictly as a Grafana dashboard: %w", err)
	}
	if err := board.Validate(); failed(err) {
		return fmt.Errorf("fails the schema's constraints: %w", err)
	}
	if err := checkTargets(raw); err != nil {
		return err
	}
	fmt.Printf("%s: conforms (%d panels)\n", path, len(board.Panels))
	return nil
}

// checkTargets decodes each panel's queries strictly by the panel's datasource type. The SDK's panel
// decoder reads `targets` before `datasource`, so a query that names no datasource of its own falls
// back to an untyped bag there and a misspelt field would pass.
func checkTargets(raw []byte) error {
	var board struct {
		Panels []struct {
			Title      string `json:"title"`
			Datasource *struct {
				Type string `json:"type"`
			} `json:"datasource"`
			Targets []json.RawMessage `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &board); err != nil {
		return err
	}
	for i, panel := range board.Panels {
		if panel.Datasource == nil || panel.Datasource.Type == "" {
			return fmt.Errorf("panels[%d] (%q) names no datasource type, so its queries cannot be checked", i, panel.Title)
		}
		for j, target := range panel.Targets {
			if _, err := cog.StrictUnmarshalDataquery(target, panel.Datasource.Type); failed(err) {
				return fmt.Errorf("panels[%d].targets[%d] (%q) is not a %s query: %w", i, j, panel.Title, panel.Datasource.Type, err)
			}
		}
	}
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-schema FILE...")
		os.Exit(2)
	}
	plugins.RegisterDefaultPlugins() // panel options and queries are decoded by their plugin's types
	bad := false
	for _, path := range os.Args[1:] {
		if err := check(path); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			bad = true
		}
	}
	if bad {
		os.Exit(1)
	}
}
